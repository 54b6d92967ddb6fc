"""What the benchmarks share: data, models, training, timers, counters and the results files.

Imported by ``benchmarks/hessian.py`` (and its ``hessian_sections``),
``benchmarks/hessian_libraries.py`` and ``benchmarks/landscape.py``, which run as scripts: their
directory is on ``sys.path``, so ``from _fixtures import ...`` finds this file from any working
directory, and importing it puts the repository root on ``sys.path`` so that ``flatminima`` is
this checkout's even in a Python where it is not installed (the PyHessian venv of
``benchmarks/hessian.py``). Import it before ``flatminima``.

Data: 28x28 MNIST from ``../shared/data/mnist`` when present (IDX files, read by
``flatminima.data.idx``), else a synthetic 10-class image set of the same shape (the returned
name says which).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import flatminima.hessian as fh  # noqa: E402
from flatminima.data.idx import MNIST_MEAN, MNIST_STD, read_idx  # noqa: E402
from flatminima.hessian._operator import CurvatureOperator  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"
MNIST = SHARED_DATA / "mnist"
# CPU time of this process, not wall time: the benchmark machine is shared, and wall time there
# measures the neighbours' load as much as the code (one thread, so no spin-waiting is counted).
clock = time.process_time


# --- data and models ------------------------------------------------------------------------------
def load_data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n`` MNIST training images, normalized, shape ``(n, 1, 28, 28)``, their labels
    and a description; the synthetic set where MNIST is absent."""
    if (MNIST / "train-images-idx3-ubyte.gz").exists():
        x = torch.from_numpy(read_idx(MNIST / "train-images-idx3-ubyte.gz"))[:n].float().div(255)
        y = torch.from_numpy(read_idx(MNIST / "train-labels-idx1-ubyte.gz"))[:n].long()
        x = ((x - MNIST_MEAN[0]) / MNIST_STD[0]).unsqueeze(1)
        return x, y, f"MNIST (first {n} train images)"
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    x = protos[y] + 1.5 * torch.randn(n, 1, 28, 28, generator=g)
    return x, y, f"synthetic 10-class 28x28 Gaussian prototypes ({n} images)"


def cnn() -> nn.Module:
    """Small CNN with BatchNorm (20.6k parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


def mlp() -> nn.Module:
    """MLP on 14x14 average-pooled images (4,978 parameters): small enough for an exact trace."""
    return nn.Sequential(nn.AvgPool2d(2), nn.Flatten(), nn.Linear(196, 24), nn.ReLU(),
                         nn.Linear(24, 10))


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0
          ) -> nn.Module:
    """A brief SGD run (batches of 128, lr 0.05, momentum 0.9); the model back in eval mode."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


# --- timers and counters --------------------------------------------------------------------------
def timed(fn, repeats: int) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def alternating(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, the order reversed on every other round so
    that no function always runs first (or right after the same neighbour)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for key in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            t0 = clock()
            fns[key]()
            times[key].append(clock() - t0)
    return {k: statistics.median(t) for k, t in times.items()}


class OurCounter:
    """Counts products of flatminima's CurvatureOperator."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig = CurvatureOperator.matmat

    def __enter__(self) -> OurCounter:
        orig, counter = self._orig, self

        def wrapped(op, vs):
            counter.calls += vs.shape[0]
            return orig(op, vs)

        CurvatureOperator.matmat = wrapped
        return self

    def __exit__(self, *exc) -> None:
        CurvatureOperator.matmat = self._orig


# --- references -----------------------------------------------------------------------------------
def reference_top(model, batch, k: int, params=None) -> torch.Tensor:
    """The top ``k`` eigenvalues by Lanczos to residual 1e-9 (a guaranteed bound), float64."""
    return fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-9, max_iter=400,
                          params=params, generator=torch.Generator().manual_seed(1234)).double()


def hutchinson_expected_rms(stats: dict, m: int) -> float:
    """Relative RMS error of Hutchinson with ``m`` Rademacher probes, in closed form:
    ``Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2)``, so the error is ``sqrt(that / m) / tr``."""
    return math.sqrt(2 * (stats["frobenius_sq"] - stats["diag_sq"]) / m) / abs(stats["exact"])


def hessian_rows(op: CurvatureOperator, block: int = 256):
    """The rows ``H e_i`` of the operator's matrix, ``block`` coordinates at a time: pairs
    ``(i, rows)``, ``rows`` float64 with one row for each of the coordinates ``i, i + 1, ...``
    (``block`` of them, fewer in the last block)."""
    for i in range(0, op.size, block):
        j = min(op.size, i + block)
        e = torch.zeros(j - i, op.size)
        e[torch.arange(j - i), torch.arange(i, j)] = 1.0
        yield i, op.matmat(e).double()


def med(rows, key):
    """Median of ``row[key]`` over the rows that have a value for it (nan if none)."""
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


# --- machine and results files --------------------------------------------------------------------
def machine() -> str:
    """The machine, as the results files describe it."""
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def machine_sentence(env: dict, software: dict[str, str] | None = None,
                     threads: int | None = None) -> str:
    """A report's first sentence, from ``env``: machine, CPUs, torch and its threads (``threads``
    where ``env`` does not record them), the ``software`` compared (name: version), Python."""
    others = "".join(f", {name} {ver}" for name, ver in (software or {}).items())
    return (f"Machine: {env['machine']}, {env['cpus']} CPUs visible (shared with other jobs), "
            f"torch {env['torch']} ({env['threads'] if threads is None else threads} thread)"
            f"{others}, Python {env['python']}.")


def utc_date() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def load_results(name: str) -> dict:
    """The stored ``benchmarks/results/<name>.json``."""
    return json.loads((RESULTS / f"{name}.json").read_text())


def save_results(name: str, res: dict, text: str, indent: int = 1) -> None:
    """Write ``<name>.md`` (the report ``text``) and ``<name>.json`` (``res``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text + "\n")
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=indent, default=str) + "\n")


def rewrite_report(name: str, write_report: Callable[[dict], str]) -> int:
    """Rewrite ``<name>.md`` from the stored ``<name>.json`` without measuring (--from-json)."""
    (RESULTS / f"{name}.md").write_text(write_report(load_results(name)) + "\n")
    return 0


def merge_section(name: str, key: str, measure: Callable[[], dict | None],
                  write_report: Callable[[dict], str], report: Callable[[dict], list[str]],
                  date: str, indent: int = 2) -> int:
    """Measure one section on its own and merge it, dated, into the stored results (--only):
    ``res[key]`` of ``<name>.json`` is replaced, ``<name>.md`` rewritten from all of it, and the
    section's own report printed."""
    res = load_results(name)
    print(f"{key} ...", flush=True)
    t0 = time.perf_counter()
    res[key] = measure()
    if res[key] is not None:
        res[key]["date"], res[key]["seconds"] = date, time.perf_counter() - t0
    save_results(name, res, write_report(res), indent=indent)
    print("\n".join(report(res)))
    return 0
