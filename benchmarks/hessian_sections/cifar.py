"""Sections 2h-2i: the top eigenvalue at CIFAR scale. ResNet-18 (11.2M parameters) trained
briefly on CPU on the CIFAR-10 JPEG copy in ``../shared/data``, then its last layer over several
batches and all parameters on one batch, flatminima against PyHessian, no oracle stop.

Not in the default run: ``benchmarks/hessian.py --only cifar`` measures it and merges it into
the stored results (676 s of wall time on 2 CPU cores in the stored run, 159 s of it training);
a full run keeps the stored section.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from _fixtures import SHARED_DATA, train

from flatminima._params import last_layer_names
from hessian_sections.eigen import bench_eigen, scenario_reports

CIFAR_JPEG = SHARED_DATA / "cifar10-jpeg.tar.gz"
CIFAR_SCENARIOS = (
    ("cifar_last", "2h. Top eigenvalue, ResNet-18 on CIFAR-10 (JPEG), last layer only, "
                   "several batches"),
    ("cifar_all", "2i. Top eigenvalue, ResNet-18 on CIFAR-10 (JPEG), all parameters, one batch"),
)


def run_cifar(quick: bool = False) -> dict | None:
    """ResNet-18 (11.2M parameters) trained briefly on CPU, then the top eigenvalue of its last
    layer over several batches and of all parameters on one batch, against PyHessian."""
    if not CIFAR_JPEG.is_file():
        print(f"  skipped: {CIFAR_JPEG} not found", flush=True)
        return None
    from flatminima.data.imagefolder import load_imagefolder
    from flatminima.models import create_model

    cache = Path(os.environ.get("TMPDIR", "/tmp")) / "flatminima-bench-cache"
    data = load_imagefolder(CIFAR_JPEG.parent, archive=CIFAR_JPEG.name, cache_dir=cache)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    n_train, size = (1024, 64) if quick else (4096, 128)
    # The image tree lists the images class by class: a seeded random subset mixes them.
    pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(0))[:n_train]
    x = (data.x_train[pick].float().div(255) - mean) / std
    y = data.y_train[pick]
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=10, input_shape=(3, 32, 32))
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)   # training only; measured on `threads`
    t0 = time.perf_counter()
    model = train(model, x, y, epochs=1 if quick else 2)
    train_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    with torch.no_grad():
        acc = float(sum((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()
                        for i in range(0, n_train, 256)) / n_train)
    batches = [(x[i:i + size], y[i:i + size]) for i in range(0, 4 * size, size)]
    small = (x[:32], y[:32])
    seeds = [0] if quick else [0, 1]
    last = set(last_layer_names(model))
    out: dict = {"env": {"data": data.label, "train_images": n_train, "epochs": 1 if quick else 2,
                         "train_seconds": train_s, "train_accuracy": acc,
                         "train_threads": os.cpu_count() or 1,
                         "params": sum(p.numel() for p in model.parameters()),
                         "last_params": sum(p.numel() for n, p in model.named_parameters()
                                            if n in last),
                         "batches": len(batches), "batch": size, "one_batch": len(small[0])}}
    print(f"  ResNet-18 trained in {train_s:.0f} s, train accuracy {acc:.2f}", flush=True)
    out["cifar_last"] = bench_eigen(model, batches, seeds, 1, pyh_iter=0, params="last_layer",
                                    oracle=False, floors=False)
    out["cifar_all"] = bench_eigen(model, small, seeds, 1, pyh_iter=0, oracle=False,
                                   floors=False)
    return out


def report(res: dict) -> list[str]:
    if not res.get("cifar"):
        return []
    c = res["cifar"]
    env = c["env"]
    lines = [
        f"## 2h-2i. CIFAR scale (measured {c.get('date', 'with the rest')})",
        "",
        f"ResNet-18 ({env['params']} parameters, last layer {env['last_params']}) trained for "
        f"{env['epochs']} epochs on {env['train_images']} training images of {env['data']} "
        f"(a seeded random subset) with SGD on {env.get('train_threads', 2)} CPU threads "
        f"({env['train_seconds']:.0f} s; "
        f"train accuracy {env['train_accuracy']:.2f}: briefly trained, as the MNIST models "
        f"above), then measured on 1 thread. Last layer: {env['batches']} batches of "
        f"{env['batch']} images; all parameters: one batch of {env['one_batch']} images. No "
        "oracle stop here: each library runs once per start vector at its own stopping rule.",
        "",
    ]
    return lines + scenario_reports(c, CIFAR_SCENARIOS)
