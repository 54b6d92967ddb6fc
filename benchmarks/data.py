"""Images per second of the batched device-side augmentation against a per-sample pipeline.

The per-sample pipeline is written here in the style of ``torchvision.transforms`` on PIL images
(torchvision itself is not required): for each image, ``RandomCrop(32, padding=4)`` ->
``RandomHorizontalFlip`` -> ``ToTensor`` -> ``Normalize`` -> ``Cutout(16)``, then the batch is
stacked (the default collate). The batched pipeline is :class:`flatminima.data.DeviceLoader`
with ``augment="cutout"`` (the same operations, on the whole batch). Both produce normalized
float32 ``(B, 3, 32, 32)`` batches in a seeded random order. ``heavy`` (random resized crop, flip,
colour jitter) is timed for the batched pipeline only.

Usage::

    python benchmarks/data.py [--device cpu|cuda] [--images N] [--threads T] [--out FILE]

One torch thread by default: the per-sample pipeline is single-threaded Python, and on a CPU shared
with other jobs torch's intra-op threads can stall each other (an op that takes 0.5 ms on one
thread was measured at 60 ms on two threads of a loaded 2-core machine).

Data: the CIFAR-10 (JPEG) copy when ``../shared/data`` is present (decoded once), otherwise random
uint8 images of the same shape (augmentation cost does not depend on pixel values).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from flatminima.data import DeviceLoader, get_dataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class PerSamplePipeline:
    """torchvision-style transforms applied one PIL image at a time, then collated."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0) -> None:
        from PIL import Image

        # A CIFAR dataset hands out PIL images; build them once, as torchvision's CIFAR10 does
        # per access from an in-memory array (Image.fromarray), counted in the loop below.
        self.x, self.y, self.bs = x.transpose(0, 2, 3, 1).copy(), y, batch_size
        self.rng = random.Random(seed)
        self.Image = Image
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def transform(self, arr: np.ndarray) -> torch.Tensor:
        from PIL import ImageOps

        img = self.Image.fromarray(arr)
        img = ImageOps.expand(img, border=4, fill=0)                   # RandomCrop(padding=4)
        i, j = self.rng.randint(0, 8), self.rng.randint(0, 8)
        img = img.crop((j, i, j + 32, i + 32))
        if self.rng.random() < 0.5:                                    # RandomHorizontalFlip
            img = img.transpose(self.Image.Transpose.FLIP_LEFT_RIGHT)
        t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        t = t.float().div(255)                                          # ToTensor
        t = (t - self.mean) / self.std                                  # Normalize
        cy, cx = self.rng.randrange(32), self.rng.randrange(32)         # Cutout(16)
        t[:, max(0, cy - 8):max(0, cy + 8), max(0, cx - 8):max(0, cx + 8)] = 0
        return t

    def __iter__(self):
        order = list(range(len(self.y)))
        self.rng.shuffle(order)
        for s in range(0, len(order), self.bs):
            idx = order[s:s + self.bs]
            yield (torch.stack([self.transform(self.x[i]) for i in idx]),
                   torch.as_tensor(self.y[idx]))


def time_epoch(loader, device: torch.device, repeats: int) -> list[float]:
    """Images per second over full passes, synchronizing the device at the end of each."""
    rates = []
    for _ in range(repeats):
        n = 0
        t0 = time.perf_counter()
        for xb, _ in loader:
            n += xb.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0))
    return rates


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    if (shared / "cifar10-jpeg.tar.gz").is_file():
        cache = Path(os.environ.get("FLATMINIMA_CACHE", "/tmp/flatminima-cache"))
        d = get_dataset("cifar10-jpeg", shared, cache_dir=cache)
        return d.x_train[:n].numpy(), d.y_train[:n].numpy(), "CIFAR-10 (JPEG) train images"
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, n),
            "random uint8 images")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y, source = load_images(args.images)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    pipelines = {"per-sample (PIL, torchvision-style), cutout":
                 (PerSamplePipeline(x, y, args.batch_size), torch.device("cpu"))}
    for aug in ("basic", "cutout", "heavy"):
        ld = DeviceLoader(xt, yt, args.batch_size, augment=aug, mean=MEAN, std=STD, seed=0,
                          device=device)
        time_epoch(ld, device, 1)   # warm-up: first-touch allocations, CUDA context
        pipelines[f"DeviceLoader batched, {aug}"] = (ld, device)
    load = os.getloadavg()[0]
    # Rounds interleave the pipelines, so each ratio compares passes made under the same load.
    rates: dict[str, list[float]] = {k: [] for k in pipelines}
    for _ in range(args.repeats):
        for name, (loader, dev) in pipelines.items():
            rates[name] += time_epoch(loader, dev, 1)
    base_name = next(iter(pipelines))
    rows = [(name, r, [a / b for a, b in zip(r, rates[base_name], strict=True)])
            for name, r in rates.items()]

    lines = [
        "# Data augmentation throughput",
        "",
        f"Device `{device}`"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
           f" ({platform.processor() or platform.machine()}, {args.threads} threads)")
        + f"; torch {torch.__version__}; {args.images} {source}; batch {args.batch_size}; "
        f"median of {args.repeats} interleaved rounds of one full pass each (min-max in "
        f"brackets); 1-minute load average "
        f"{load:.1f} at the start (other jobs share this CPU).",
        "",
        "| pipeline | images/s | speed-up vs per-sample (same round) |",
        "|---|---:|---:|",
    ]
    for name, r, ratio in rows:
        lines.append(f"| {name} | {statistics.median(r):,.0f} [{min(r):,.0f}-{max(r):,.0f}] | "
                     f"{statistics.median(ratio):.1f}x [{min(ratio):.1f}-{max(ratio):.1f}] |")
    lines += ["", "The per-sample pipeline runs in the main process; a `DataLoader` with k worker "
              "processes divides its cost by at most k (and this machine has 2 cores shared with "
              "other jobs). The batched pipeline needs no workers and, on a GPU, no host-to-device "
              "copy of images per batch.", "", "Produced by `python benchmarks/data.py"
              + (f" --device {args.device}" if args.device != "cpu" else "") + "`."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
