"""Landscape, model-divergence and basin-radius evaluation: vmapped weight sets against one
pass per point.

``fm.landscape``, ``fm.divergence`` and ``fm.volume`` evaluate the model at many weight sets.
They can stack a chunk of weight sets and run them through one ``torch.func.vmap``-ed forward
pass, or run one forward pass per weight set; by default each evaluator times both on its first
few points and keeps the faster (``PointEvaluator._decide``). This file measures, side by side in
one process (alternating rounds, CPU time of the process), on the same model, data and points:

* ``default``: what a user gets (its choice included: 4 points one pass each and 4 vmapped on
  the first batch, timed), and which way it chose;
* ``vmap``: chunks of the evaluator's largest size (``chunk_size`` = up to 64);
* ``one pass per point``: ``chunk_size=1``;
* ``plain loop``: the way loss-landscape (Li et al. 2018) evaluates a grid, the model's weights
  overwritten in place for each point and the batches run through it.

and checks that all four give the same losses.

    python benchmarks/landscape.py [--quick]      # about 10 minutes on 2 CPU cores

Data: MNIST from ``../shared/data/mnist`` when present (else a synthetic image set of the same
shape; the results say which); the ResNet-18 rows time random CIFAR-shaped inputs (timing does
not depend on the values).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _fixtures import (  # before flatminima: puts this checkout on sys.path
    clock,
    cnn,
    load_data,
    machine,
    machine_sentence,
    mlp,
    save_results,
    train,
    utc_date,
)
from torch import nn

import flatminima as fm
from flatminima.landscape import PointEvaluator


class ChoiceRecorder:
    """Records what every evaluator's probe chose (the chunk size it kept)."""

    def __init__(self) -> None:
        self.choices: list[int] = []
        self._original = PointEvaluator._decide

    def __enter__(self) -> ChoiceRecorder:
        original, choices = self._original, self.choices

        def decide(ev, chunk, x, y):
            out = original(ev, chunk, x, y)
            if ev.chunk_size is not None:
                choices.append(ev.chunk_size)
            return out

        PointEvaluator._decide = decide
        return self

    def __exit__(self, *exc) -> None:
        PointEvaluator._decide = self._original


def plain_loop_plane(model: nn.Module, batches, d1, d2, alphas, betas) -> torch.Tensor:
    """The loss on the grid the straightforward way: overwrite the weights, run the batches."""
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = torch.zeros(len(alphas), len(betas), dtype=torch.float64)
    total = sum(len(y) for _, y in batches)
    with torch.no_grad():
        try:
            for i, a in enumerate(alphas):
                for j, b in enumerate(betas):
                    for n, p in model.named_parameters():
                        p.copy_(w0[n] + a * d1[n] + b * d2[n])
                    out[i, j] = sum(float(F.cross_entropy(model(x), y)) * len(y)
                                    for x, y in batches) / total
        finally:
            for n, p in model.named_parameters():
                p.copy_(w0[n])
    return out


def plane_case(model: nn.Module, batches, n_grid: int, max_chunk: int) -> dict[str, Callable]:
    g = torch.Generator().manual_seed(0)
    d1 = fm.landscape.random_direction(model, generator=g)
    d2 = fm.landscape.random_direction(model, generator=g)
    grid = torch.linspace(-1, 1, n_grid)

    def ours(chunk: int | None) -> Callable[[], torch.Tensor]:
        return lambda: fm.landscape.plane(model, F.cross_entropy, batches, d1, d2, grid, grid,
                                          chunk_size=chunk).loss.reshape(-1)

    return {"default": ours(None), "vmap": ours(max_chunk), "one pass per point": ours(1),
            "plain loop": lambda: plain_loop_plane(model, batches, d1, d2, grid.tolist(),
                                                   grid.tolist()).reshape(-1)}


def radius_case(model: nn.Module, batches, directions: int, max_chunk: int
                ) -> dict[str, Callable]:
    def ours(chunk: int | None) -> Callable[[], torch.Tensor]:
        return lambda: fm.volume.basin_radius(
            model, F.cross_entropy, batches, num_directions=directions,
            generator=torch.Generator().manual_seed(0), chunk_size=chunk).radii.reshape(-1)

    return {"default": ours(None), "vmap": ours(max_chunk), "one pass per point": ours(1)}


def divergence_case(model: nn.Module, batches, samples: int, max_chunk: int
                    ) -> dict[str, Callable]:
    def ours(chunk: int | None) -> Callable[[], torch.Tensor]:
        return lambda: torch.tensor([fm.divergence.model_divergence(
            model, batches, 0.05, samples, generator=torch.Generator().manual_seed(0),
            chunk_size=chunk)])

    return {"default": ours(None), "vmap": ours(max_chunk), "one pass per point": ours(1)}


def measure(name: str, fns: dict[str, Callable], rounds: int) -> dict:
    """Alternating rounds; the median CPU time of each way, the default's choices and the
    largest relative difference of its values from one pass per point."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    values: dict[str, torch.Tensor] = {}
    choices: list[int] = []
    for r in range(rounds):
        order = list(fns) if r % 2 == 0 else list(reversed(fns))
        for key in order:
            with ChoiceRecorder() as rec:
                t0 = clock()
                values[key] = fns[key]().double()
                times[key].append(clock() - t0)
            if key == "default":
                choices += rec.choices
        print(f"  {name} round {r}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    ref = values["one pass per point"]
    return {
        "case": name,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "chose": sorted(set(choices)),
        "max_rel_diff": {k: float(((v - ref).abs() / ref.abs().clamp_min(1e-12)).max())
                         for k, v in values.items()},
    }


def report(res: dict) -> str:
    env = res["env"]
    lines = [
        "# Landscape, divergence and basin-radius evaluation: vmapped weight sets against one "
        "pass per point",
        "",
        machine_sentence(env) + " CPU seconds of the process (`time.process_time`), median "
        f"of {env['rounds']} alternating rounds. Data: "
        f"{env['data']}. Generated by `benchmarks/landscape.py` on {env['date']}; total "
        f"{res['total_s']:.0f} s.",
        "",
        "`default` is what `fm.landscape`, `fm.divergence` and `fm.volume` do without "
        "`chunk_size`: on the first "
        "batch they evaluate 4 points one pass each and 4 in one vmapped pass, timed, and the "
        "faster way does the rest (every evaluation is used; the slower way's 4 points are in "
        "its time). `vmap` stacks up to 64 weight sets per forward pass (5 for ResNet-18: about "
        "256 MB of weights); `one pass per point` is `chunk_size=1`; `plain loop` overwrites "
        "the model's weights for each grid point and runs the batches, as loss-landscape does.",
        "",
        "| case | default (chose) | vmap | one pass per point | plain loop | vmap / one pass "
        "| default / best | max rel. difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cases"]:
        s = c["seconds"]
        chose = "/".join("vmap" if ch > 1 else "per point" for ch in c["chose"]) or "-"
        best = min(s["vmap"], s["one pass per point"])
        loop = f"{s['plain loop']:.2f}" if "plain loop" in s else "-"
        diff = max(c["max_rel_diff"].values())
        lines.append(
            f"| {c['case']} | {s['default']:.2f} ({chose}) | {s['vmap']:.2f} | "
            f"{s['one pass per point']:.2f} | {loop} | {s['vmap'] / s['one pass per point']:.2f}x "
            f"| {s['default'] / best:.2f} | {diff:.1e} |")
    lines += [
        "",
        "Neither way is faster everywhere: on a CPU vmap turns every convolution into a grouped "
        "one over permuted activations (and max-pooling and BatchNorm copy them back to a "
        "contiguous layout), which costs more than the separate passes it replaces, while an "
        "MLP's layers become one batched matrix product each. The default's probe picks the "
        "faster way per model and machine.",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller grids (smoke run)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    x, y, data_name = load_data(2048)
    torch.manual_seed(0)
    model_cnn = train(cnn(), x, y, epochs=1)
    model_mlp = train(mlp(), x, y, epochs=1)
    resnet = fm.models.create_model("resnet18", 10, (3, 32, 32)).eval()
    xr = torch.randn(64 if args.quick else 128, 3, 32, 32,
                     generator=torch.Generator().manual_seed(0))
    yr = torch.randint(0, 10, (len(xr),), generator=torch.Generator().manual_seed(1))

    def split(n: int, size: int = 512):
        return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]

    q = args.quick
    cases = [
        ("MNIST CNN (BatchNorm, 20.6k parameters), plane "
         f"{5 if q else 7}x{5 if q else 7}, {512 if q else 1024} images",
         plane_case(model_cnn, split(512 if q else 1024), 5 if q else 7, 64)),
        (f"MNIST MLP (5.0k parameters), plane {11 if q else 21}x{11 if q else 21}, 2048 images",
         plane_case(model_mlp, split(2048), 11 if q else 21, 64)),
        (f"ResNet-18 (11.2M parameters), plane 3x3, {len(xr)} CIFAR-shaped inputs",
         plane_case(resnet, [(xr, yr)], 3, 5)),
        ("MNIST CNN, model divergence (rho 0.05), 32 samples, 1024 images",
         divergence_case(model_cnn, split(1024), 32, 64)),
        ("MNIST MLP, model divergence (rho 0.05), 64 samples, 2048 images",
         divergence_case(model_mlp, split(2048), 64, 64)),
        ("MNIST CNN, basin radius, 5 directions (10 rays), 256 images",
         radius_case(model_cnn, split(256), 5, 64)),
        ("MNIST MLP, basin radius, 20 directions (40 rays), 2048 images",
         radius_case(model_mlp, split(2048), 20, 64)),
    ]
    res: dict = {"env": {
        "machine": machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "data": data_name, "rounds": args.rounds,
        "date": utc_date(),
    }, "cases": []}
    for name, fns in cases:
        print(name, flush=True)
        res["cases"].append(measure(name, fns, args.rounds))
    res["total_s"] = time.perf_counter() - t_start
    text = report(res)
    print(text)
    if not args.quick:
        save_results("landscape", res, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
