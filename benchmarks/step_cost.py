"""Step cost of every method relative to Baseline, measured side by side in one run.

For each model (an MLP and a small CNN) and each method, one training step is
``method.backward(...)`` + ``opt.step()`` + ``opt.zero_grad()``. Methods are timed interleaved
(round-robin over methods, many rounds) so that drift of the machine affects all alike; the table
gives the median time per step and its ratio to Baseline's median. Peak memory is read from the
PyTorch profiler's memory timeline: the largest total of tensor memory alive during one step
(weights, gradients, optimizer state, activations, autograd graphs, perturbations, temporaries).

    python benchmarks/step_cost.py [--rounds 30] [--out benchmarks/results/step_cost.md]

On CPU with glibc, freed blocks above the mmap threshold go back to the OS every step and are
page-faulted in again at the next; the cost grows with the memory a step holds, so it hits
methods that keep two autograd graphs (NRS) hardest. Run it a second time with
``MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736`` to see the methods' own
cost (``--out benchmarks/results/step_cost_malloc_tuned.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import flatminima as fm

METHODS = {
    "baseline": {},
    "rpr": {"rho": 0.05},
    "nrs": {"rho": 0.05, "alpha": 1.0},
    "nrs (low_memory)": {"rho": 0.05, "alpha": 1.0, "low_memory": True},
    "sam": {"rho": 0.05},
    "asam": {"rho": 0.5},
    "nso (k=1)": {"sigma": 0.01},
    "smoothout": {"a": 0.01},
    "adasmoothout": {"a": 0.01},
    "rwp": {"gamma": 0.01},
    "msam": {"rho": 3.0},
    "msam (clean_pass=False)": {"rho": 3.0, "clean_pass": False},
    "esam": {"rho": 0.05, "beta": 0.6, "gamma": 0.5},
    "vasso": {"rho": 0.05, "theta": 0.9},
    "fisher_sam": {"rho": 0.1, "eta": 1.0},
    "gam": {},
    "gsam": {"rho": 0.05, "alpha": 0.4},
    "wsam": {"rho": 0.05, "gamma": 0.9},
    "gcsam": {"rho": 0.05},
    "friendlysam": {"rho": 0.05, "sigma": 1.0, "lmbda": 0.9},
    "sam (m=32)": {"rho": 0.05, "m": 32},
    "sam (every=5)": {"rho": 0.05},
    "sam (looksam k=5)": {"rho": 0.05},
    "nrs (every=2, difference)": {"rho": 0.05, "alpha": 1.0},
    "nrs (every=5)": {"rho": 0.05, "alpha": 1.0},
}
# Labels run through fm.Every, with its arguments. They are timed over whole periods of
# ``every`` steps (the time per step is the period's over ``every``): the median of single steps
# would report the cheap off-steps alone.
WRAPPED = {
    "sam (every=5)": {"every": 5},
    "sam (looksam k=5)": {"every": 5, "reuse": "looksam", "alpha": 0.7},
    "nrs (every=2, difference)": {"every": 2, "reuse": "difference"},
    "nrs (every=5)": {"every": 5},
}


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    return model, torch.randn(256, 784), torch.randint(0, 10, (256,))


def small_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The `flatminima compare` default: MNIST-1D's 40 inputs, MLP 40-256-256-10, batch 100."""
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    return model, torch.randn(100, 40), torch.randint(0, 10, (100,))


def cnn() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(),
                nn.MaxPool2d(2)]

    model = nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 128), nn.Flatten(),
                          nn.Linear(128 * 16, 10))
    return model, torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))


def make_method(label: str, opt: torch.optim.Optimizer) -> fm.Method:
    method = fm.create_method(label.split(" ")[0], **METHODS[label])
    if "optimizer" in method.declared:  # MSAM reads the optimizer's momentum
        method.optimizer = opt
    return fm.Every(method, **WRAPPED[label]) if label in WRAPPED else method


MODELS = {
    "mlp": (mlp, "MLP 784-512-512-10, batch 256"),
    "cnn": (cnn, "CNN 3x(conv-BN-ReLU-pool) 32/64/128 + linear, 3x32x32 input, batch 64"),
    "small": (small_mlp, "the compare default's MLP 40-256-256-10, batch 100 (overhead-bound)"),
}


def one_step(method, model, opt, x, y, gen) -> None:
    method.backward(model, x, y, generator=gen)
    opt.step()
    opt.zero_grad(set_to_none=False)


def peak_step_memory(method, model, opt, x, y, gen, tmp: Path, steps: int = 1) -> int:
    """Bytes: the high-water mark of all tensor memory (weights, gradients, optimizer state,
    activations, graphs, temporaries) during ``steps`` steps (a whole period of an ``Every``
    method, whose on-step holds the most), from the profiler's memory timeline."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        for _ in range(steps):
            one_step(method, model, opt, x, y, gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        prof.export_memory_timeline(str(tmp), device="cpu")
    _, sizes = json.loads(tmp.read_text())
    return int(max(sum(row) for row in sizes))


def bench(model_fn, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    base_model, x, y = model_fn()
    states = {}
    for label in METHODS:
        torch.manual_seed(0)
        model, _, _ = model_fn()
        model.load_state_dict(base_model.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        method = make_method(label, opt)
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):  # warm-up, also creates grads and momentum buffers
            one_step(method, model, opt, x, y, gen)
        states[label] = (method, model, opt, gen)
    times: dict[str, list[float]] = {label: [] for label in METHODS}
    for _ in range(rounds):
        for label, (method, model, opt, gen) in states.items():
            period = WRAPPED.get(label, {}).get("every", 1)
            t0 = time.perf_counter()
            for _ in range(period):
                one_step(method, model, opt, x, y, gen)
            times[label].append((time.perf_counter() - t0) / period)
    rows = []
    base_t = statistics.median(times["baseline"])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d) / "timeline.json"
        mem = {label: peak_step_memory(*s[:3], x, y, s[3], tmp,
                                       WRAPPED.get(label, {}).get("every", 1))
               for label, s in states.items()}
    for label in METHODS:
        t = statistics.median(times[label])
        row = {"method": label, "ms_per_step": 1e3 * t, "time_ratio": t / base_t,
               "peak_MiB": mem[label] / 2**20, "memory_ratio": mem[label] / mem["baseline"]}
        if label in WRAPPED:  # the floor: Baseline's cost plus the method's excess once in k
            inner = statistics.median(times[label.split(" ")[0]]) / base_t
            row["expected_ratio"] = 1 + (inner - 1) / WRAPPED[label]["every"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_cost.md"))
    ap.add_argument("--models", default="mlp,cnn",
                    help=f"comma list of {', '.join(MODELS)} (default: mlp,cnn)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, Python "
               f"{platform.python_version()}, load average {load:.1f} at start")
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    machine += f", glibc malloc settings {tuned}" if tuned else ", default glibc malloc"
    lines = ["# Step cost relative to Baseline (CPU)", "",
             f"Machine: {machine}. Rounds: {args.rounds} (interleaved), median per step.", "",
             "A method run through `fm.Every` (`every=k`) is timed over whole periods of k "
             "steps; `1 + excess/k` is its floor, Baseline's cost plus the wrapped method's "
             "excess over Baseline (its own row) once in k steps.", "",
             f"Command: `python benchmarks/step_cost.py --models {args.models}`", ""]
    results = {}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in MODELS]
    if unknown or not names:
        ap.error(f"--models: unknown model {unknown[0] if unknown else ''!r}; choose from "
                 f"{', '.join(MODELS)}")
    for name in names:
        fn, desc = MODELS[name]
        rows = bench(fn, args.rounds)
        results[name] = rows
        lines += [f"## {desc}", "",
                  "| method | ms / step | time vs Baseline | 1 + excess/k | peak memory (MiB) | "
                  "memory vs Baseline |", "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            expected = f"{r['expected_ratio']:.2f}x" if "expected_ratio" in r else ""
            lines.append(f"| {r['method']} | {r['ms_per_step']:.1f} | {r['time_ratio']:.2f}x | "
                         f"{expected} | {r['peak_MiB']:.1f} | {r['memory_ratio']:.2f}x |")
        lines.append("")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine, **results}, indent=1))


if __name__ == "__main__":
    main()
