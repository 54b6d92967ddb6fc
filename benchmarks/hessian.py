"""Hessian measurements side by side with PyHessian, on the same model, data and machine.

What it measures (results in ``benchmarks/results/hessian.md`` and ``.json``):

1. Hessian-vector product cost of each strategy (double-backward with the gradient graph kept,
   double-backward rebuilt per product, forward-over-reverse; single vectors and blocks of 8;
   eval-mode BatchNorm folded into the layer before it, as an affine map, or through its fused
   kernel, also on CIFAR-shaped ResNet-18 and WRN-16-4).
   This measurement decides ``mode="auto"`` in ``flatminima.hessian``.
2. Top eigenvalue: wall time and number of Hessian-vector products to reach 1e-3 relative error,
   ``fm.hessian.eigenvalues`` (Lanczos, residual stopping rule ``tol=1e-3``) against PyHessian's
   ``hessian.eigenvalues`` (power iteration, its default ``tol=1e-3``); plus, for both, the first
   product count at which the running estimate is within 1e-3 of the reference (an oracle stop).
   The reference is a Lanczos run to residual 1e-9 (a guaranteed bound).
   Settings: one batch (both libraries keep the gradient graph) and several batches (PyHessian in
   its dataloader mode), all parameters and the last layer only; and the top 5 eigenvalues
   (PyHessian: power iteration with deflation, one eigenvalue after the other), also on an
   untrained CNN whose top eigenvalues crowd: how often a run returns a wrong fifth value; and
   at CIFAR scale (``--only cifar``, not in the default run: about 12 minutes), ResNet-18
   trained briefly on CPU on the CIFAR-10 JPEG copy, last layer over several batches and all
   parameters on one batch.
3. Trace at equal budgets of products: flatminima's krylov (default), Hutch++ and Hutchinson and
   PyHessian's Hutchinson against the exact trace (sum of ``e_i^T H e_i`` over all coordinates),
   RMS relative error over seeds, and Hutchinson's error in closed form from the dense Hessian.
4. Bounded memory (flatminima only): what capping the Lanczos basis costs. Top 5 eigenvalues
   with ``max_basis`` (thick restart) against the unbounded basis, and the SLQ density without
   reorthogonalization (two vectors held) against full reorthogonalization.

PyHessian is not a dependency of flatminima: run this file with a Python that has it, e.g.

    python3 -m venv /tmp/venv-pyhessian
    /tmp/venv-pyhessian/bin/pip install torch==2.13.0 pyhessian pillow
    /tmp/venv-pyhessian/bin/python benchmarks/hessian.py            # ~10 minutes on 2 CPU cores
    /tmp/venv-pyhessian/bin/python benchmarks/hessian.py --only memory   # one section, merged
    /tmp/venv-pyhessian/bin/python benchmarks/hessian.py --only clusters

Data: 28x28 MNIST from ``../shared/data/mnist`` when present (IDX files), else a synthetic
10-class image set of the same shape (the results file says which).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flatminima.hessian as fh  # noqa: E402
from flatminima._params import last_layer_names  # noqa: E402
from flatminima.hessian._eigen import start_vector  # noqa: E402
from flatminima.hessian._lanczos import lanczos  # noqa: E402
from flatminima.hessian._operator import CurvatureOperator  # noqa: E402

try:
    import pyhessian
    from pyhessian import hessian as PyHessian

    # The package re-exports the class under the module's name: take the module itself.
    pyh_mod = sys.modules["pyhessian.hessian"]
except ImportError:  # pragma: no cover - reported in the output
    pyhessian = None

RESULTS = ROOT / "benchmarks" / "results"
# CPU time of this process, not wall time: the benchmark machine is shared, and wall time there
# measures the neighbours' load as much as the code (one thread, so no spin-waiting is counted).
clock = time.process_time
MNIST = ROOT.parent / "shared" / "data" / "mnist"


# --- data and models ------------------------------------------------------------------------------
def read_idx(path: Path) -> torch.Tensor:
    raw = gzip.open(path).read()
    ndim = struct.unpack(">I", raw[:4])[0] & 0xFF
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8).reshape(dims)


def load_data(n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    if (MNIST / "train-images-idx3-ubyte.gz").exists():
        x = read_idx(MNIST / "train-images-idx3-ubyte.gz")[:n].float().div(255)
        y = read_idx(MNIST / "train-labels-idx1-ubyte.gz")[:n].long()
        return ((x - 0.1307) / 0.3081).unsqueeze(1), y, f"MNIST (first {n} train images)"
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


# --- helpers ----------------------------------------------------------------------------------
class _Converged(Exception):
    """Raised inside a recorded run once the estimate has settled within the tolerance."""


class Counter:
    """Counts calls of PyHessian's hessian_vector_product, optionally recording v^T H v.

    With ``stop_at=(ref, rtol)`` the recorded run is cut once 5 consecutive estimates are within
    ``rtol`` of ``ref`` (the oracle stop needs no more of the trajectory).
    """

    def __init__(self, record: bool = False, stop_at: tuple[float, float] | None = None
                 ) -> None:
        self.calls, self.record, self.trace, self.stop_at = 0, record, [], stop_at
        self.t0 = clock()
        self._orig = pyh_mod.hessian_vector_product
        # Dataset mode: one call of dataloader_hv_product is one product over all batches.
        self._orig_loader = PyHessian.dataloader_hv_product

    def _count(self, rq: float | None) -> None:
        self.calls += 1
        if self.record:
            self.trace.append((self.calls, clock() - self.t0, rq))
            if self.stop_at is not None and len(self.trace) >= 5:
                ref, rtol = self.stop_at
                if all(abs(t[2] - ref) <= rtol * abs(ref) for t in self.trace[-5:]):
                    raise _Converged

    def __enter__(self) -> Counter:
        def wrapped(grads, params, v):
            hv = self._orig(grads, params, v)
            rq = (float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
                  if self.record else None)
            self._count(rq)
            return hv

        orig_loader = self._orig_loader

        def wrapped_loader(hc, v):
            rq, hv = orig_loader(hc, v)
            self._count(rq)
            return rq, hv

        pyh_mod.hessian_vector_product = wrapped
        PyHessian.dataloader_hv_product = wrapped_loader
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        pyh_mod.hessian_vector_product = self._orig
        PyHessian.dataloader_hv_product = self._orig_loader
        return exc_type is _Converged


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


def pyhessian_for(model, data):
    """PyHessian on one batch (graph kept) or, for a list of batches, in its dataloader mode."""
    # PyHessian calls loss.backward(create_graph=True): stale .grad from an earlier instance
    # would be added into its gradient (and so into its Hessian). Start from clean grads.
    model.zero_grad(set_to_none=True)
    if isinstance(data, list):
        return PyHessian(model, F.cross_entropy, dataloader=data, cuda=False)
    return PyHessian(model, F.cross_entropy, data=data, cuda=False)


def timed(fn, repeats: int) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def first_within(values: list[tuple[int, float, float]], ref: float, rtol: float):
    """First (count, seconds) after which every estimate is within rtol of ref."""
    hit = None
    for count, secs, val in values:
        if abs(val - ref) <= rtol * abs(ref):
            hit = hit or (count, secs)
        else:
            hit = None
    return hit


# --- 1. hvp strategies ----------------------------------------------------------------------------
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


# Kept-graph product variants of section 1: CurvatureOperator switches, all on by default.
KEPT_VARIANTS = {
    "double_backward_kept": {},
    "double_backward_kept_no_piecewise": {"lean_piecewise": False},
    "double_backward_kept_no_data_conv": {"data_convs": False},
    "double_backward_kept_plain_torch": {"data_convs": False, "lean_piecewise": False},
    "double_backward_kept_affine_bn": {"fold_norms": False},
    "double_backward_kept_fused_bn": {"affine_norms": False},
}


def bench_hvp(model, x, y, repeats: int) -> dict:
    batch = (x, y)
    out = {}
    kept = {key: CurvatureOperator(model, F.cross_entropy, batch, mode="double_backward",
                                   cache_graph=True, **kw) for key, kw in KEPT_VARIANTS.items()}
    op_db = kept["double_backward_kept"]
    op_db_re = CurvatureOperator(model, F.cross_entropy, batch, mode="double_backward",
                                 cache_graph=False)
    op_fr = CurvatureOperator(model, F.cross_entropy, batch, mode="forward_over_reverse")
    n = op_db.size
    v = torch.randn(n)
    vs = torch.randn(8, n)
    out["graph_build_ms"] = 1e3 * timed(lambda: op_db._grad_graph(0), repeats)
    out["folds"] = len(op_db.folds)
    products = {}
    for key, op in kept.items():
        op.matvec(v)  # builds and keeps the graph
        products[key] = lambda op=op: op.matvec(v)
    if pyhessian is not None:
        hc = pyhessian_for(model, batch)
        vl = [torch.randn_like(p) for p in hc.params]
        products["pyhessian_hvp"] = lambda: pyh_mod.hessian_vector_product(hc.gradsH,
                                                                          hc.params, vl)
    # The kept-graph products differ by 5-40%: time them in alternation, twice the rounds.
    for key, secs in alternating(products, 2 * repeats).items():
        out[f"{key}_ms"] = 1e3 * secs
    out["double_backward_rebuilt_ms"] = 1e3 * timed(lambda: op_db_re.matvec(v), repeats)
    out["forward_over_reverse_ms"] = 1e3 * timed(lambda: op_fr.matvec(v), repeats)
    out["block8_double_backward_kept_ms_per_vec"] = 1e3 * timed(lambda: op_db.matmat(vs),
                                                                repeats) / 8
    out["block8_double_backward_rebuilt_ms_per_vec"] = 1e3 * timed(lambda: op_db_re.matmat(vs),
                                                                   repeats) / 8
    out["block8_forward_over_reverse_ms_per_vec"] = 1e3 * timed(lambda: op_fr.matmat(vs),
                                                                repeats) / 8
    # Equality of the strategies on this model (max relative difference).
    ref = op_db.matmat(vs)
    others = {"rebuilt": op_db_re, "forward_over_reverse": op_fr,
              **{key.removeprefix("double_backward_kept_"): op for key, op in kept.items()
                 if key != "double_backward_kept"}}
    for name, op in others.items():
        out[f"max_rel_diff_{name}"] = float((op.matmat(vs) - ref).norm() / ref.norm())
    return out


def product_times(state_path: str, n_train: int, n_batch: int, rounds: int) -> dict:
    """CPU ms per product of flatminima (default) and PyHessian on the CNN stored at
    ``state_path``, one batch, graphs kept, in alternation (run in a child process)."""
    torch.set_num_threads(1)
    x, y, _ = load_data(n_train)
    batch = (x[:n_batch], y[:n_batch])
    model = cnn()
    model.load_state_dict(torch.load(state_path))
    model.eval()
    op = CurvatureOperator(model, F.cross_entropy, batch, cache_graph=True)
    v = torch.randn(op.size)
    op.matvec(v)
    fns = {"flatminima": lambda: op.matvec(v)}
    if pyhessian is not None:
        hc = pyhessian_for(model, batch)
        vl = [torch.randn_like(p) for p in hc.params]
        fns["pyhessian"] = lambda: pyh_mod.hessian_vector_product(hc.gradsH, hc.params, vl)
    return {f"{k}_ms": 1e3 * t for k, t in alternating(fns, rounds).items()}


# CPU memory settings compared in section 1: environment variables read when the process starts.
ALLOCATORS = {
    "default": ("default (glibc malloc, 4 KiB pages)", {}),
    "huge_pages": ("`THP_MEM_ALLOC_ENABLE=1` (PyTorch's allocator asks for transparent huge "
                   "pages)", {"THP_MEM_ALLOC_ENABLE": "1"}),
    "malloc_keeps": ("`MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184` "
                     "(glibc serves blocks under 32 MiB from its heap and keeps freed memory)",
                     {"MALLOC_MMAP_THRESHOLD_": "33554432",
                      "MALLOC_TRIM_THRESHOLD_": "17179869184"}),
}


def bench_allocators(model, n_train: int, n_batch: int, rounds: int) -> dict:
    """The products of section 1 in one child process per :data:`ALLOCATORS` setting: how much
    of a product is the kernel handing out fresh pages for new activations."""
    import subprocess
    import tempfile

    names = {k for _, env in ALLOCATORS.values() for k in env}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "cnn.pt")
        torch.save(model.state_dict(), state)
        for key, (_, extra) in ALLOCATORS.items():
            env = {k: v for k, v in os.environ.items() if k not in names}
            env.update(extra)
            done = subprocess.run(
                [sys.executable, __file__, "--product-times", state, str(n_train), str(n_batch),
                 str(rounds)], env=env, capture_output=True, text=True, check=True)
            out[key] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {key}: {out[key]}", flush=True)
    return out


def allocators_report(alloc: dict | None) -> list[str]:
    if not alloc:
        return []
    lines = [
        "Much of a product's time on CPU is the kernel handing out fresh pages for new "
        "activations (glibc returns large freed blocks to the system, so each product faults "
        "its activations in again). Two environment settings, read when the process starts, "
        "avoid most of it; the same products in one child process per setting, alternating "
        "rounds (CPU ms per product):",
        "",
        "| memory setting | flatminima | PyHessian | PyHessian / flatminima |",
        "|---|---|---|---|",
    ]
    for key, (label, _) in ALLOCATORS.items():
        if key not in alloc:
            continue
        r = alloc[key]
        ours, theirs = r["flatminima_ms"], r.get("pyhessian_ms", float("nan"))
        lines.append(f"| {label} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |")
    return [*lines, ""]


def bench_small_activations(model, batch, rounds: int) -> dict:
    """MLP products (activations of 512 x 24) with the ReLU path forced on every activation
    against the default, which leaves activations below ``MIN_NUMEL`` to PyTorch: the
    measurement behind that threshold."""
    import flatminima.hessian._piecewise as piecewise

    ops = {key: CurvatureOperator(model, F.cross_entropy, batch, cache_graph=True)
           for key in ("forced", "default")}
    v = torch.randn(ops["default"].size)
    threshold = piecewise.MIN_NUMEL
    piecewise.MIN_NUMEL = 0
    try:
        ops["forced"].matvec(v)                # builds the graph through the new path
    finally:
        piecewise.MIN_NUMEL = threshold
    ops["default"].matvec(v)
    medians = alternating({k: lambda op=op: op.matvec(v) for k, op in ops.items()}, rounds)
    return {"min_numel": threshold, **{f"{k}_ms": 1e3 * t for k, t in medians.items()}}


def bench_norm_folding(repeats: int) -> dict:
    """Product cost with BatchNorm folded / affine / fused on two CIFAR-shaped models (random
    weights, perturbed running statistics, one batch of 32 random images)."""
    from flatminima.hessian._eval_norm import eval_batchnorms
    from flatminima.models.registry import create_model

    out = {}
    for name, kw in (("resnet18", {}), ("wrn16_4", {"depth": 16, "widen_factor": 4})):
        torch.manual_seed(0)
        model = create_model("resnet18" if name == "resnet18" else "wrn28_10", **kw).eval()
        for bn in eval_batchnorms(model):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        batch = (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
        ops = {"folded": CurvatureOperator(model, F.cross_entropy, batch),
               "folded_plain_torch": CurvatureOperator(model, F.cross_entropy, batch,
                                                       data_convs=False, lean_piecewise=False),
               "affine": CurvatureOperator(model, F.cross_entropy, batch, fold_norms=False),
               "fused": CurvatureOperator(model, F.cross_entropy, batch, affine_norms=False)}
        v = torch.randn(ops["folded"].size)
        for op in ops.values():
            op.matvec(v)
        products = {k: lambda op=op, v=v: op.matvec(v) for k, op in ops.items()}
        medians = alternating(products, repeats)
        out[name] = {"params": ops["folded"].size, "norms": len(ops["affine"]._norms),
                     "folds": len(ops["folded"].folds),
                     **{f"{k}_ms": 1e3 * t for k, t in medians.items()}}
        print(f"  {name}: {out[name]}", flush=True)
    return out


# --- 2. top eigenvalue ------------------------------------------------------------------------
def reference_top(model, batch, k: int, params=None) -> torch.Tensor:
    return fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-9, max_iter=400,
                          params=params, generator=torch.Generator().manual_seed(1234)).double()


class only_trainable:
    """PyHessian measures every parameter with requires_grad: freeze the others meanwhile."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        self.model, self.names = model, names

    def __enter__(self) -> None:
        if self.names is not None:
            for n, p in self.model.named_parameters():
                p.requires_grad_(n in self.names)

    def __exit__(self, *exc) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)


def floor_times(model, data, names: list[str] | None, repeats: int = 5) -> dict:
    """CPU seconds of one forward pass (which no method can skip) and one gradient, on the
    same model and data.

    ``forward_s``: one forward pass over the data (every method reads it through the network).
    ``gradient_s``: one gradient of the size-weighted mean loss with respect to the measured
    parameters (forward and backward), for scale: a Hessian-vector product differentiates
    through that computation once more.
    """
    batches = data if isinstance(data, list) else [data]
    total = sum(len(y) for _, y in batches)
    chosen = [p for n, p in model.named_parameters() if names is None or n in names]

    def forward() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    def gradient() -> None:
        with only_trainable(model, names):
            loss = sum(len(y) / total * F.cross_entropy(model(x), y) for x, y in batches)
            torch.autograd.grad(loss, chosen)

    forward(), gradient()  # warm up
    return {"forward_s": timed(forward, repeats), "gradient_s": timed(gradient, repeats)}


def bench_eigen(model, batch, seeds: list[int], k: int, pyh_iter: int, params=None,
                oracle: bool = True, floors: bool = True) -> dict:
    ref = reference_top(model, batch, k, params)
    names = last_layer_names(model) if params == "last_layer" else None
    rows = []
    for seed in seeds:
        row = {"seed": seed}

        def run_ours(row: dict = row, seed: int = seed) -> None:
            # flatminima, its own stopping rule
            with OurCounter() as c:
                t0 = clock()
                ours = fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-3, params=params,
                                      generator=torch.Generator().manual_seed(seed)).double()
                row["ours_s"] = clock() - t0
            row["ours_matvecs"] = c.calls
            row["ours_rel_err"] = float(((ours - ref).abs() / ref.abs()).max())
            if k != 1:   # the default start is the random one: nothing more to compare
                return
            # flatminima from a Rademacher start alone (the default for k=1 adds the gradient)
            with OurCounter() as c:
                t0 = clock()
                plain = fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-3,
                                       params=params, start="random",
                                       generator=torch.Generator().manual_seed(seed)).double()
                row["ours_random_s"] = clock() - t0
            row["ours_random_matvecs"] = c.calls
            row["ours_random_rel_err"] = float(((plain - ref).abs() / ref.abs()).max())
            # flatminima, oracle stop: first Lanczos step with the top Ritz value within 1e-3,
            # from each run's start vector (its trajectory up to that run's stop contains it)
            for key, kind in (("ours", "gradient"), ("ours_random", "random")):
                if not oracle:
                    break
                t0 = clock()
                op = CurvatureOperator(model, F.cross_entropy, batch, params)
                hist = []

                def cb(step, ritz, _res, hist=hist, t0=t0):
                    hist.append((step, clock() - t0, float(ritz.max())))

                start = start_vector(op, kind, torch.Generator().manual_seed(seed))
                lanczos(op.matvec, start, row[f"{key}_matvecs"], tol=None, callback=cb)
                hit = first_within(hist, float(ref[0]), 1e-3)
                row[f"{key}_oracle_matvecs"], row[f"{key}_oracle_s"] = hit if hit else (None, None)

        def run_pyhessian(row: dict = row, seed: int = seed) -> None:
            torch.manual_seed(seed)
            with Counter() as c, only_trainable(model, names):
                t0 = clock()
                hc = pyhessian_for(model, batch)
                vals, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
                row["pyh_s"] = clock() - t0
            row["pyh_matvecs"] = c.calls
            got = torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)
            row["pyh_rel_err"] = float(((got - ref).abs() / ref.abs()).max())
            if k == 1 and oracle:
                torch.manual_seed(seed)
                with (Counter(record=True, stop_at=(float(ref[0]), 1e-3)) as c,
                      only_trainable(model, names)):
                    hc = pyhessian_for(model, batch)
                    hc.eigenvalues(maxIter=pyh_iter, tol=0.0, top_n=1)
                hit = first_within(c.trace, float(ref[0]), 1e-3)
                row["pyh_oracle_matvecs"], row["pyh_oracle_s"] = hit if hit else (None, None)

        # Alternate which library goes first: on a shared machine the first of two runs can
        # be systematically slower or faster (caches, allocator, neighbours).
        order = [run_ours, run_pyhessian] if seed % 2 == 0 else [run_pyhessian, run_ours]
        for run in order:
            if run is run_ours or pyhessian is not None:
                run()
        rows.append(row)
        print(f"  k={k} seed {seed}: " + ", ".join(
            f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
            for key, val in row.items() if key != "seed"), flush=True)
    floor = floor_times(model, batch, names) if k == 1 and floors else {}
    return {"reference": ref.tolist(), "runs": rows, "floors": floor}


# --- 2g. a clustered spectrum ----------------------------------------------------------------
def bench_clusters(model, batch, k: int, seeds: list[int], pyh_seeds: list[int]) -> dict:
    """Top-k eigenvalues where they crowd (an untrained CNN): how often each library returns a
    wrong k-th value. Lanczos's stopping rule bounds each value's distance to *an* eigenvalue but
    cannot see one the start vector has barely touched; ``starts=2`` merges two runs."""
    # The reference: k + 3 values to residual 1e-9 from two starts (runs of 100+ products see
    # every eigenvalue of the cluster), checked to agree with a third start.
    ref = fh.eigenvalues(model, F.cross_entropy, batch, k=k + 3, tol=1e-9, max_iter=400,
                         starts=2, generator=torch.Generator().manual_seed(1234)).double()
    check = reference_top(model, batch, k + 3)
    out = {"reference": ref[:k].tolist(), "next": ref[k:].tolist(),
           "reference_agreement": float(((ref - check).abs() / ref.abs()).max()), "runs": []}
    ref = ref[:k]

    def rel(vals) -> float:
        got = torch.sort(torch.as_tensor(vals, dtype=torch.float64), descending=True).values
        return float(((got - ref).abs() / ref.abs()).max())

    for starts in (1, 2):
        for seed in seeds:
            with OurCounter() as c:
                t0 = clock()
                vals = fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-3,
                                      starts=starts, generator=torch.Generator().manual_seed(seed))
                secs = clock() - t0
            out["runs"].append({"library": f"flatminima starts={starts}", "seed": seed,
                                "matvecs": c.calls, "s": secs, "rel_err": rel(vals),
                                "values": vals.tolist()})
            print(f"  clusters starts={starts} seed {seed}: {out['runs'][-1]}", flush=True)
    if pyhessian is not None:
        for seed in pyh_seeds:
            torch.manual_seed(seed)
            with Counter() as c:
                t0 = clock()
                vals, _ = pyhessian_for(model, batch).eigenvalues(maxIter=100, tol=1e-3, top_n=k)
                secs = clock() - t0
            out["runs"].append({"library": "PyHessian", "seed": seed, "matvecs": c.calls,
                                "s": secs, "rel_err": rel(vals), "values": list(vals)})
            print(f"  clusters PyHessian seed {seed}: {out['runs'][-1]}", flush=True)
    return out


def run_clusters(batch, quick: bool = False) -> dict:
    """The section on an untrained CNN (seeded; eval mode, BatchNorm at its initial statistics)."""
    torch.manual_seed(0)
    model = cnn().eval()
    seeds = list(range(4 if quick else 8))
    return bench_clusters(model, batch, 5, seeds, [0] if quick else [0, 1])


def bench_start(cases: dict, seeds: list[int]) -> dict:
    """Lanczos to 1e-3 from a Rademacher start and from the gradient start (the default for
    k=1) on the same seeds: products and misses (largest relative error above 1e-3) for each
    ``(model, data, k)`` case."""
    out = {}
    for name, (model, data, k) in cases.items():
        ref = fh.eigenvalues(model, F.cross_entropy, data, k=k + 3, tol=1e-9, max_iter=400,
                             starts=2, generator=torch.Generator().manual_seed(1234))[:k].double()
        entry = {"k": k, "reference": ref.tolist()}
        for start in ("random", "gradient"):
            runs = []
            for seed in seeds:
                with OurCounter() as c:
                    vals = fh.eigenvalues(model, F.cross_entropy, data, k=k, tol=1e-3,
                                          start=start,
                                          generator=torch.Generator().manual_seed(seed))
                err = float(((vals.double() - ref).abs() / ref.abs()).max())
                runs.append({"seed": seed, "matvecs": c.calls, "rel_err": err})
            entry[start] = runs
            print(f"  start {name} {start}: products "
                  f"{[r['matvecs'] for r in runs]}, misses "
                  f"{sum(r['rel_err'] > 1e-3 for r in runs)}", flush=True)
        out[name] = entry
    return out


def run_start(batch, model_cnn, quick: bool = False) -> dict:
    """The start-vector section: the trained CNN and the untrained one of section 2g."""
    torch.manual_seed(0)
    raw = cnn().eval()
    cases = {"trained CNN, k=1": (model_cnn, batch, 1),
             "trained CNN, k=5": (model_cnn, batch, 5),
             "untrained CNN, k=1": (raw, batch, 1),
             "untrained CNN, k=5": (raw, batch, 5)}
    return bench_start(cases, list(range(4 if quick else 8)))


def start_report(st: dict | None) -> list[str]:
    if not st:
        return []
    lines = [
        "## 2j. Start vectors: a random one against the gradient start",
        "",
        "Lanczos to 1e-3 (guaranteed residual rule) on one batch, all parameters, from the same "
        "seeds: a Rademacher vector (`start=\"random\"`) and that vector plus the loss "
        "gradient at half its length (`start=\"gradient\"`, the default for `k=1`). A run "
        "misses when its largest relative error exceeds 1e-3 (a skipped eigenvalue)."
        + (f" Measured {st['date']}." if "date" in st else ""),
        "",
        "| model, k | start | products (median, range) | misses | max rel. error |",
        "|---|---|---|---|---|",
    ]
    for name, e in st.items():
        if not isinstance(e, dict):
            continue
        for start in ("random", "gradient"):
            runs = e[start]
            counts = [r["matvecs"] for r in runs]
            misses = sum(r["rel_err"] > 1e-3 for r in runs)
            lines.append(
                f"| {name} | {start} | {statistics.median(counts):.0f} ({min(counts)}-"
                f"{max(counts)}) | {misses} of {len(runs)} | "
                f"{max(r['rel_err'] for r in runs):.1e} |")
    lines += [
        "",
        "The gradient of a trained network lies mostly in its top eigenspace (Gur-Ari et al. "
        "2018), so the start leans towards the top eigenvector and the single top eigenvalue "
        "converges in fewer products; for several eigenvalues it favours some of them, which "
        "can then converge before an unfavoured one has appeared, so `start=\"auto\"` uses it "
        "for `k=1` only.",
        "",
    ]
    return lines


def clusters_report(cl: dict | None) -> list[str]:
    if not cl:
        return []
    ref = ", ".join(f"{v:.4g}" for v in cl["reference"])
    nxt = ", ".join(f"{v:.4g}" for v in cl["next"])
    lines = [
        f"## 2g. Top {len(cl['reference'])} eigenvalues where they crowd (untrained CNN, all "
        "parameters, one batch)",
        "",
        f"Reference (Lanczos to residual 1e-9, two starts; a third start agrees to "
        f"{cl['reference_agreement']:.1e}): {ref}; next: {nxt}. "
        + (f"Measured {cl['date']}. " if cl.get("date") else "") +
        "A run *misses* when its largest "
        "relative error exceeds 1e-3: it returned a value of the next eigenvalue in place of one "
        "of the cluster (or, for PyHessian, stopped before converging).",
        "",
        "| library | start vectors | misses | products (median) | CPU time (s, median) | "
        "max rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for lib in dict.fromkeys(r["library"] for r in cl["runs"]):
        rows = [r for r in cl["runs"] if r["library"] == lib]
        misses = sum(r["rel_err"] > 1e-3 for r in rows)
        lines.append(
            f"| {lib} | {len(rows)} | {misses} of {len(rows)} | "
            f"{statistics.median(r['matvecs'] for r in rows):g} | "
            f"{statistics.median(r['s'] for r in rows):.3g} | "
            f"{max(r['rel_err'] for r in rows):.1e} |")
    lines += [
        "",
        "Every value flatminima returns is within 1e-3 of *an* eigenvalue (the residual rule) and "
        "at most the eigenvalue of its rank (Cauchy interlacing), so a miss is always downwards, "
        "to the next eigenvalue; no Krylov method can certify that none was skipped. "
        "`starts=2` runs twice and keeps the larger value at each rank (twice the products).",
        "",
    ]
    return lines


# --- 2h-2i. CIFAR scale ------------------------------------------------------------------------
CIFAR_JPEG = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
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


def cifar_report(res: dict) -> list[str]:
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
    for key, title in CIFAR_SCENARIOS:
        if key in c:
            lines += eigen_report(c[key], title)
    return lines


# --- 4. bounded memory ------------------------------------------------------------------------
def bench_memory(model, batch, seeds: list[int], caps: list[int], steps: int) -> dict:
    """Top 5 with a capped basis (thick restart) and SLQ with and without reorthogonalization."""
    ref = reference_top(model, batch, 5)
    n = sum(p.numel() for p in model.parameters())
    out: dict = {"reference": ref.tolist(), "params": n, "eigen": [], "density": {}}
    for cap in [None, *caps]:
        for seed in seeds:
            with OurCounter() as c:
                t0 = clock()
                got = fh.eigenvalues(model, F.cross_entropy, batch, k=5, tol=1e-3,
                                     max_basis=cap if cap else 10_000,
                                     generator=torch.Generator().manual_seed(seed)).double()
                sec = clock() - t0
            out["eigen"].append({"max_basis": cap, "seed": seed, "matvecs": c.calls, "s": sec,
                                 "rel_err": float(((got - ref).abs() / ref.abs()).max())})
            print(f"  top 5, max_basis={cap}, seed {seed}: {c.calls} products, {sec:.2f} s",
                  flush=True)
    dens = {}
    for reorth in (True, False):
        t0 = clock()
        nodes, weights = fh.density_nodes(model, F.cross_entropy, batch, num_steps=steps,
                                          generator=torch.Generator().manual_seed(0),
                                          reorthogonalize=reorth)
        dens[reorth] = (nodes, weights)
        out["density"]["reorth" if reorth else "none"] = {
            "s": clock() - t0, "vectors_held": steps if reorth else 2,
            "copies_of_top": int(((nodes[0] - ref[0]).abs() < 1e-4 * ref[0]).sum())}
    lo = min(float(d[0].min()) for d in dens.values())
    hi = max(float(d[0].max()) for d in dens.values())
    sigma = 0.01 * (hi - lo)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 2000, dtype=torch.float64)

    def smooth(nodes, weights):
        k = torch.exp(-0.5 * ((grid[:, None] - nodes[0][None]) / sigma) ** 2)
        return (k * weights[0][None]).sum(1) / (sigma * math.sqrt(2 * math.pi))

    a, b = smooth(*dens[True]), smooth(*dens[False])
    out["density"]["l1_distance"] = float(torch.trapezoid((a - b).abs(), grid))
    moments = {}
    for p in range(1, 5):
        m_r = float((dens[True][1][0] * dens[True][0][0] ** p).sum())
        m_n = float((dens[False][1][0] * dens[False][0][0] ** p).sum())
        moments[p] = abs(m_n - m_r) / abs(m_r)
    out["density"]["moment_rel_diff"] = moments
    out["density"]["steps"] = steps
    print(f"  density: {out['density']}", flush=True)
    return out


# --- 3. trace ---------------------------------------------------------------------------------
def curvature_stats(model, batch) -> dict:
    """Exact ``tr(H)``, ``||H||_F^2`` and ``sum_i H_ii^2`` from all ``n`` rows ``H e_i``."""
    op = CurvatureOperator(model, F.cross_entropy, batch)
    trace = fro = diag_sq = 0.0
    block = 256
    for i in range(0, op.size, block):
        j = min(op.size, i + block)
        e = torch.zeros(j - i, op.size)
        e[torch.arange(j - i), torch.arange(i, j)] = 1.0
        rows = op.matmat(e).double()
        d = rows[torch.arange(j - i), torch.arange(i, j)]
        trace += float(d.sum())
        diag_sq += float((d * d).sum())
        fro += float((rows * rows).sum())
    return {"exact": trace, "frobenius_sq": fro, "diag_sq": diag_sq}


def hutchinson_expected_rms(stats: dict, m: int) -> float:
    """Relative RMS error of Hutchinson with ``m`` Rademacher probes, in closed form:
    ``Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2)``, so the error is ``sqrt(that / m) / tr``."""
    return math.sqrt(2 * (stats["frobenius_sq"] - stats["diag_sq"]) / m) / abs(stats["exact"])


def bench_trace(model, batch, budgets: list[int], seeds: list[int], pyh_seeds: list[int]
                ) -> dict:
    stats = curvature_stats(model, batch)
    exact = stats["exact"]
    out = {**stats, "seeds": len(seeds), "pyh_seeds": len(pyh_seeds), "budgets": {}}
    for m in budgets:
        errs: dict[str, list[float]] = {key: [] for key in (*fh.TRACE_METHODS, "pyhessian")}
        times: dict[str, list[float]] = {key: [] for key in errs}
        for method in fh.TRACE_METHODS:
            for seed in seeds:
                t0 = clock()
                t = fh.trace(model, F.cross_entropy, batch, m, method=method,
                             generator=torch.Generator().manual_seed(seed))
                times[method].append(clock() - t0)
                errs[method].append((float(t) - exact) / exact)
        if pyhessian is not None:
            for seed in pyh_seeds:
                torch.manual_seed(seed)
                t0 = clock()
                hc = pyhessian_for(model, batch)
                samples = hc.trace(maxIter=m, tol=0.0)
                times["pyhessian"].append(clock() - t0)
                errs["pyhessian"].append((sum(samples) / len(samples) - exact) / exact)
        out["budgets"][m] = {
            key: {"rms_rel_err": math.sqrt(sum(e * e for e in v) / len(v)),
                  "median_s": statistics.median(times[key])}
            for key, v in errs.items() if v
        }
        out["budgets"][m]["hutchinson_expected"] = {
            "rms_rel_err": hutchinson_expected_rms(stats, m)}
        print(f"  trace m={m}: " + ", ".join(
            f"{key} {val['rms_rel_err']:.3g}" for key, val in out["budgets"][m].items()),
            flush=True)
    return out


# --- report -----------------------------------------------------------------------------------
def med(rows, key):
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else float("nan")


SCENARIOS = (
    ("eigen_k1", "2a. Top eigenvalue, CNN, all parameters, one batch"),
    ("eigen_last", "2b. Top eigenvalue, CNN, last layer only (the NRS paper's Table 3 measure), "
                   "one batch"),
    ("eigen_mlp", "2c. Top eigenvalue, MLP, all parameters, one batch"),
    ("eigen_ds", "2d. Top eigenvalue, CNN, all parameters, several batches"),
    ("eigen_ds_last", "2e. Top eigenvalue, CNN, last layer only, several batches"),
    ("eigen_k5", "2f. Top 5 eigenvalues, CNN, all parameters, one batch"),
)


def write_report(res: dict) -> str:
    env, hv = res["env"], res["hvp"]
    lines = [
        "# Hessian measurements: flatminima vs PyHessian",
        "",
        f"Machine: {env['machine']}, {env['cpus']} CPUs visible (shared with other jobs), "
        f"torch {env['torch']} ({env['threads']} thread), PyHessian {env['pyhessian']}, "
        f"Python {env['python']}. Times are CPU seconds of the benchmark process "
        "(`time.process_time`), which the shared machine's load disturbs far less than wall "
        "time; product counts are exact. For each start vector the two libraries take turns "
        "at running first.",
        f"Data: {env['data']}. Models: a CNN with BatchNorm ({env['cnn_params']} parameters, "
        f"last layer {env['cnn_last_params']}) and an MLP ({env['mlp_params']} parameters), "
        f"trained briefly with SGD. \"One batch\": {env['batch']} images, both libraries keep "
        f"the gradient graph. \"Several batches\": {env['ds_images']} images in batches of "
        f"{env['batch']}, PyHessian in its dataloader mode. Generated by "
        f"`benchmarks/hessian.py` on {env['date']}; total {res['seconds']:.0f} s.",
        "",
        f"## 1. Hessian-vector product strategies (CNN, {env['cnn_params']} parameters, one "
        "batch)",
        "",
        "| strategy | CPU ms per product |",
        "|---|---|",
        f"| build the gradient graph once (forward + backward, create_graph) | "
        f"{hv['graph_build_ms']:.1f} |",
        f"| double-backward, graph kept (the default: BatchNorm folded into the "
        f"{hv.get('folds', 0)} convolution/linear layers before it, the data's convolution "
        f"without the data's gradient, ReLU and max-pooling without zero tensors) | "
        f"{hv['double_backward_kept_ms']:.1f} |",
        *optional_row(hv, "double_backward_kept_no_piecewise_ms",
                      "the same, ReLU and max-pooling through PyTorch's double-backward"),
        *optional_row(hv, "double_backward_kept_no_data_conv_ms",
                      "the same, the data's convolution through PyTorch's double-backward"),
        *optional_row(hv, "double_backward_kept_plain_torch_ms",
                      "the same, both through PyTorch's double-backward"),
        *optional_row(hv, "double_backward_kept_affine_bn_ms",
                      "the default with BatchNorm as an affine map x*s+t, not folded"),
        *optional_row(hv, "double_backward_kept_fused_bn_ms",
                      "the default with BatchNorm through its fused kernel"),
        f"| double-backward, graph rebuilt per product | {hv['double_backward_rebuilt_ms']:.1f} |",
        f"| forward-over-reverse (torch.func.jvp of grad) | {hv['forward_over_reverse_ms']:.1f} |",
        f"| block of 8, double-backward kept (is_grads_batched) | "
        f"{hv['block8_double_backward_kept_ms_per_vec']:.1f} |",
        f"| block of 8, double-backward rebuilt | "
        f"{hv['block8_double_backward_rebuilt_ms_per_vec']:.1f} |",
        f"| block of 8, forward-over-reverse (vmap) | "
        f"{hv['block8_forward_over_reverse_ms_per_vec']:.1f} |",
    ]
    if "pyhessian_hvp_ms" in hv:
        lines.append(f"| PyHessian's product (graph kept) | {hv['pyhessian_hvp_ms']:.1f} |")
    agree = max(v for k, v in hv.items() if k.startswith("max_rel_diff_"))
    lines += [
        "",
        f"All strategies agree (max relative difference {agree:.1e}). Decision for "
        f"`mode=\"auto\"`: {res['decision']}",
        "",
        *allocators_report(res.get("allocators")),
        *small_activations_report(res.get("small_activations")),
        *fold_report(res.get("norm_folding")),
        "Where the time goes in sections 2d-2e: flatminima keeps the gradient graph of every "
        "batch when all of them fit a quarter of the available memory (PyHessian's dataloader "
        "mode rebuilds forward, backward and graph for every batch and product), and for a "
        "parameter subset owned by the output module (the last layer) it computes that "
        "module's inputs once and runs every product through it alone (checked to be exact; "
        "`flatminima/hessian/_trunk.py`).",
        "",
    ]
    for key, title in SCENARIOS:
        if key in res:
            lines += eigen_report(res[key], title)
    lines += clusters_report(res.get("clusters"))
    lines += start_report(res.get("start"))
    lines += cifar_report(res)
    t = res["trace"]
    lines += [
        f"## 3. Trace at equal budgets (MLP, {env['mlp_params']} parameters, one batch)",
        "",
        f"Exact trace {t['exact']:.6g} from all {env['mlp_params']} coordinate products. RMS "
        f"relative error over {t['seeds']} seeds for flatminima's estimators and "
        f"{t['pyh_seeds']} for PyHessian's (an RMS over S seeds is itself uncertain by about "
        "1/sqrt(2S): 7% at 100 seeds); \"expected\" is Hutchinson's RMS error in closed form, "
        "sqrt(2 (||H||_F^2 - sum_i H_ii^2) / m) / tr(H), from the dense Hessian. Ratios are to "
        "that closed form.",
        "",
        "| products | krylov (default) | Hutch++ | Hutchinson (flatminima) | Hutchinson "
        "(PyHessian) | Hutchinson expected | krylov / Hutchinson | Hutch++ / Hutchinson |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, b in t["budgets"].items():
        pyh = f"{b['pyhessian']['rms_rel_err']:.3g}" if "pyhessian" in b else "n/a"
        ref = b["hutchinson_expected"]["rms_rel_err"]
        lines.append(
            f"| {m} | {b['krylov']['rms_rel_err']:.3g} | {b['hutch++']['rms_rel_err']:.3g} | "
            f"{b['hutchinson']['rms_rel_err']:.3g} | {pyh} | {ref:.3g} | "
            f"{b['krylov']['rms_rel_err'] / ref:.2f} | {b['hutch++']['rms_rel_err'] / ref:.2f} |")
    lines.append("")
    if "memory" in res:
        lines += memory_report(res["memory"])
    lines += targets(res)
    return "\n".join(lines)


def eigen_report(e: dict, title: str) -> list[str]:
    """One top-eigenvalue section (table, speed-ups, floors)."""
    lines: list[str] = []
    rows = e["runs"]
    one = len(e["reference"]) == 1
    lines += [
        f"## {title}: to 1e-3 relative error (median over {len(rows)} start vectors)",
        "",
        "Reference (Lanczos to residual 1e-9): "
        + ", ".join(f"{v:.6g}" for v in e["reference"]),
        "",
        "| method | stopping rule | Hessian-vector products | CPU time (s) | max rel. error |",
        "|---|---|---|---|---|",
        f"| flatminima Lanczos{' (default: gradient start)' if 'ours_random_s' in rows[0] else ''}"
        f" | residual <= 1e-3 * theta (guaranteed) | "
        f"{med(rows, 'ours_matvecs'):.0f} | {med(rows, 'ours_s'):.3g} | "
        f"{med(rows, 'ours_rel_err'):.1e} |",
    ]
    if "ours_random_s" in rows[0]:
        lines.append(
            f"| flatminima Lanczos, `start=\"random\"` | residual <= 1e-3 * theta (guaranteed) | "
            f"{med(rows, 'ours_random_matvecs'):.0f} | {med(rows, 'ours_random_s'):.3g} | "
            f"{med(rows, 'ours_random_rel_err'):.1e} |")
    if "pyh_s" in rows[0]:
        rule = ("relative change < 1e-3 (default), deflation for each further eigenvalue"
                if not one else "relative change < 1e-3 (default)")
        lines.append(
            f"| PyHessian power iteration | {rule} | "
            f"{med(rows, 'pyh_matvecs'):.0f} | {med(rows, 'pyh_s'):.3g} | "
            f"{med(rows, 'pyh_rel_err'):.1e} |")
    if one and "ours_oracle_s" in rows[0]:
        label = "flatminima Lanczos" + (" (gradient start)" if "ours_random_s" in rows[0] else "")
        lines.append(
            f"| {label} | oracle: first step within 1e-3 | "
            f"{med(rows, 'ours_oracle_matvecs'):.0f} | {med(rows, 'ours_oracle_s'):.3g} | "
            "<= 1e-3 |")
        if "ours_random_oracle_s" in rows[0]:
            lines.append(
                f"| flatminima Lanczos, `start=\"random\"` | oracle: first step within 1e-3 | "
                f"{med(rows, 'ours_random_oracle_matvecs'):.0f} | "
                f"{med(rows, 'ours_random_oracle_s'):.3g} | <= 1e-3 |")
        if "pyh_oracle_s" in rows[0]:
            lines.append(
                f"| PyHessian power iteration | oracle: first step within 1e-3 | "
                f"{med(rows, 'pyh_oracle_matvecs'):.0f} | {med(rows, 'pyh_oracle_s'):.3g} "
                "| <= 1e-3 |")
    if "pyh_s" in rows[0]:
        speed = [r["pyh_s"] / r["ours_s"] for r in rows]
        lines += ["", f"Speed-up at each library's own stopping rule: median "
                  f"{statistics.median(speed):.1f}x (per start vector: "
                  f"{', '.join(f'{s:.1f}x' for s in speed)})."]
        if "ours_random_s" in rows[0]:
            plain = [r["pyh_s"] / r["ours_random_s"] for r in rows]
            lines[-1] += (f" From a random start: median {statistics.median(plain):.1f}x "
                          f"({', '.join(f'{s:.1f}x' for s in plain)}).")
        if one:
            ok = [r for r in rows if r.get("pyh_oracle_s") and r.get("ours_oracle_s")]
            if ok:
                sp = [r["pyh_oracle_s"] / r["ours_oracle_s"] for r in ok]
                lines.append(f"Speed-up at the oracle stop: median "
                             f"{statistics.median(sp):.1f}x.")
        if one and e.get("floors"):
            lines += ["", floor_sentence(e)]
    lines.append("")
    return lines


def small_activations_report(small: dict | None) -> list[str]:
    if not small:
        return []
    return [
        f"ReLU and max-pooling take the path without zero tensors only on activations of "
        f"{small['min_numel']} elements or more: on the MLP (activations of 512 x 24, graph "
        f"kept, alternating rounds) a product costs {small['forced_ms']:.3f} ms with the path "
        f"forced on every activation and {small['default_ms']:.3f} ms with PyTorch's "
        f"double-backward there (the default), the Python-level autograd Functions costing "
        f"more than the zeros they save.",
        "",
    ]


def optional_row(hv: dict, key: str, label: str) -> list[str]:
    """A table row for a measurement that older result files may lack."""
    return [f"| {label} | {hv[key]:.1f} |"] if key in hv else []


def fold_report(fold: dict | None) -> list[str]:
    if not fold:
        return []
    lines = [
        "Folding BatchNorm into the layer before it saves the elementwise work on every "
        "activation, and the data's convolution and the ReLU/max-pooling paths save a "
        "transposed convolution and two zero tensors per layer, which matter on the small CNN "
        "above; on wider CIFAR-shaped models (random weights, one batch of 32, CPU ms per "
        "product, median of 7 alternating runs) the convolutions between the layers dominate, "
        "and the differences between the variants are of the order of the spread between "
        "reruns on this shared machine (5-15%):",
        "",
        "| model | parameters | BatchNorms folded | folded | affine | fused kernel | folded, "
        "data convolution and ReLU through PyTorch's double-backward |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in fold.items():
        plain = r.get("folded_plain_torch_ms", float("nan"))
        lines.append(f"| {name} | {r['params']} | {r['folds']} of {r['norms']} | "
                     f"{r['folded_ms']:.0f} | {r['affine_ms']:.0f} | {r['fused_ms']:.0f} | "
                     f"{plain:.0f} |")
    return [*lines, ""]


def memory_report(mem: dict) -> list[str]:
    n, ref = mem["params"], mem["reference"]
    lines = [
        f"## 4. Bounded memory (CNN, {n} parameters, one batch)",
        "",
        f"Measured on {mem.get('date', 'the date above')} with the same models and data.",
        "",
        "Top 5 eigenvalues to 1e-3 (guaranteed residual rule) with the Lanczos basis capped at "
        "`max_basis` vectors (thick restart) against an unbounded basis; median over "
        f"{len({r['seed'] for r in mem['eigen']})} start vectors. Reference: "
        + ", ".join(f"{v:.6g}" for v in ref) + ".",
        "",
        "| max_basis | vectors held (MB here; GB for 36.5M parameters) | products | CPU time (s) "
        "| max rel. error |",
        "|---|---|---|---|---|",
    ]
    caps = list(dict.fromkeys(r["max_basis"] for r in mem["eigen"]))
    for cap in caps:
        rows = [r for r in mem["eigen"] if r["max_basis"] == cap]
        held = max(r["matvecs"] for r in rows) if cap is None else cap
        label = "unbounded" if cap is None else str(cap)
        lines.append(
            f"| {label} | {held} ({held * n * 4 / 1e6:.1f} MB; {held * 36.5e6 * 4 / 1e9:.1f} "
            f"GB) | {med(rows, 'matvecs'):.0f} | {med(rows, 's'):.2f} | "
            f"{med(rows, 'rel_err'):.1e} |")
    d = mem["density"]
    mom = ", ".join(f"p={p}: {v:.1e}" for p, v in d["moment_rel_diff"].items())
    lines += [
        "",
        f"SLQ density, {d['steps']} Lanczos steps (as many products either way), one start "
        f"vector: full reorthogonalization holds {d['steps']} vectors ({d['reorth']['s']:.2f} s "
        f"of CPU time), the bare recurrence 2 ({d['none']['s']:.2f} s). Without "
        f"reorthogonalization the nodes hold {d['none']['copies_of_top']} copies of the top "
        f"eigenvalue (with: {d['reorth']['copies_of_top']}; copies share its weight); the "
        f"smoothed "
        f"densities differ by {d['l1_distance']:.1e} in L1 (each integrates to 1) and the "
        f"quadrature moments sum tau theta^p by {mom} (relative).",
        "",
    ]
    return lines


def floor_bounds(e: dict) -> tuple[float, float] | None:
    """Best possible speed-ups over PyHessian (own rule, oracle stop) of any method: PyHessian's
    time over one forward pass through the data, which no method can skip; medians."""
    fl, rows = e.get("floors"), e["runs"]
    if not fl or "pyh_s" not in rows[0]:
        return None
    own = statistics.median(r["pyh_s"] for r in rows) / fl["forward_s"]
    orc = [r["pyh_oracle_s"] for r in rows if r.get("pyh_oracle_s")]
    return own, statistics.median(orc) / fl["forward_s"] if orc else float("nan")


def floor_sentence(e: dict) -> str:
    fl, rows = e["floors"], e["runs"]
    bounds = floor_bounds(e)
    if bounds is None:
        return ""
    own, orc = bounds
    text = (f"Floors: every method reads the data through the network at least once; one "
            f"forward pass takes {fl['forward_s']:.3f} s (one gradient {fl['gradient_s']:.3f} "
            f"s), so no method can be more than {own:.1f}x faster than PyHessian at its own "
            f"stopping rule or {orc:.1f}x at the oracle stop.")
    key = "ours_random" if "ours_random_oracle_matvecs" in rows[0] else "ours"
    ok = [r for r in rows if r.get("pyh_oracle_matvecs") and r.get(f"{key}_oracle_matvecs")]
    if ok:
        ratio = statistics.median(r["pyh_oracle_matvecs"] / r[f"{key}_oracle_matvecs"]
                                  for r in ok)
        text += (
            " And from the same random start vector no method that builds its estimate from "
            "products with that vector's Krylov space (power iteration, Lanczos) can reach 1e-3 "
            "in fewer products than Lanczos's oracle count: its top Ritz value is the largest "
            "Rayleigh quotient over that space, where every power-iteration estimate lies. With "
            f"products of equal cost that caps the gain over PyHessian's power iteration at "
            f"{ratio:.1f}x (products at the oracle stop); the rest has to come from a cheaper "
            "product or a better start vector.")
    return text


def targets(res: dict) -> list[str]:
    """The project's two targets, checked against the numbers above."""
    out = ["## Targets", ""]
    cifar = res.get("cifar") or {}
    sections = [(title, res.get(key)) for key, title in SCENARIOS]
    sections += [(title, cifar.get(key)) for key, title in CIFAR_SCENARIOS]
    for title, entry in sections:
        rows = (entry or {}).get("runs", [])
        if not rows or "pyh_s" not in rows[0]:
            continue
        name = title.split(". ", 1)[1]
        own = statistics.median(r["pyh_s"] / r["ours_s"] for r in rows)
        missed = sum(r["pyh_rel_err"] > 1e-3 for r in rows)
        ok = [r for r in rows if r.get("pyh_oracle_s") and r.get("ours_oracle_s")]
        if ok:
            prod = statistics.median(r["pyh_oracle_matvecs"] / r["ours_oracle_matvecs"]
                                     for r in ok)
            cpu = statistics.median(r["pyh_oracle_s"] / r["ours_oracle_s"] for r in ok)
            verdict = "met" if min(cpu, own) >= 3 else "not met"
            bounds = floor_bounds(entry)
            if verdict == "not met" and bounds is not None:
                best = min(bounds)
                verdict += (f"; out of reach for any method (the floor allows {best:.1f}x)"
                            if best < 3 else f" (the floor allows {best:.1f}x)")
            out.append(
                f"- {name}: PyHessian needs {prod:.1f}x the products to reach 1e-3; CPU time "
                f"ratio {cpu:.1f}x at the oracle stop and {own:.1f}x at each library's own "
                f"stopping rule (PyHessian's own rule missed 1e-3 on {missed} of {len(rows)} "
                f"starts). Target 3x: **{verdict}**.")
        else:
            verdict = "met" if own >= 3 else "not met"
            out.append(
                f"- {name}: CPU time ratio {own:.1f}x at each library's own stopping rule "
                f"(PyHessian missed 1e-3 on {missed} of {len(rows)} starts). Target 3x: "
                f"**{verdict}**.")
    if "eigen_k5" in res and "eigen_k1" in res:
        top = res["eigen_k5"]["reference"]
        rows = res["eigen_k1"]["runs"]
        random_oracle = (f", {med(rows, 'ours_random_oracle_matvecs'):.0f} from a random start"
                         if "ours_random_oracle_matvecs" in rows[0] else "")
        out.append(
            f"- Where 3x is not reached for one top eigenvalue of all parameters: the top "
            f"eigenvalue is well separated ({top[0]:.3g} against {top[1]:.3g} next, ratio "
            f"{top[1] / top[0]:.2f}), so power iteration is within 1e-3 after "
            f"{med(rows, 'pyh_oracle_matvecs'):.0f} products and Lanczos after "
            f"{med(rows, 'ours_oracle_matvecs'):.0f} from the default start (the gradient "
            f"added to a random vector){random_oracle}; the guaranteed stopping rule takes "
            f"one or two products more. A product is a double-backward through the same "
            f"network in both libraries ({res['hvp']['double_backward_kept_ms']:.0f} ms "
            f"against PyHessian's {res['hvp'].get('pyhessian_hvp_ms', float('nan')):.0f} ms in "
            f"section 1: flatminima folds eval-mode BatchNorm into the layer before it, skips "
            f"the data's second-order gradient in the first convolution and the zero tensors "
            f"of ReLU and max-pooling), and both pay for one graph build "
            f"({res['hvp'].get('graph_build_ms', float('nan')):.0f} ms), so on one batch the "
            f"time ratio is at most about the product ratio times the count ratio. Over "
            f"several batches flatminima also keeps the graphs where PyHessian rebuilds them "
            f"for every product, and the 3x is reached; it is reached as well where the "
            f"products differ in number or in cost: several eigenvalues at once, and a last "
            f"layer over several batches. The floor under each section bounds what any method "
            f"could reach on the same model and data.")
    for m, b in res["trace"]["budgets"].items():
        ref = b["hutchinson_expected"]["rms_rel_err"]
        pp, kr = b["hutch++"]["rms_rel_err"] / ref, b["krylov"]["rms_rel_err"] / ref
        out.append(
            f"- Trace, {m} products: error / Hutchinson's = {pp:.2f} for Hutch++ "
            f"(**{'met' if pp <= 0.5 else 'not met'}**), {kr:.2f} for krylov "
            f"(**{'met' if kr <= 0.5 else 'not met'}**); target <= 0.5.")
    out.append("")
    return out


def merge_section(key: str, measure, report, date: str) -> int:
    """Measure one section on its own and merge it, dated, into the stored results (--only)."""
    res = json.loads((RESULTS / "hessian.json").read_text())
    print(f"{key} ...", flush=True)
    t0 = time.perf_counter()
    res[key] = measure()
    if res[key] is not None:
        res[key]["date"], res[key]["seconds"] = date, time.perf_counter() - t0
    (RESULTS / "hessian.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (RESULTS / "hessian.md").write_text(write_report(res) + "\n")
    print("\n".join(report(res)))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer seeds and budgets (smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--from-json", action="store_true",
                    help="rewrite hessian.md from the stored hessian.json without measuring")
    ap.add_argument("--product-times", nargs=4, metavar=("STATE", "N_TRAIN", "N_BATCH", "ROUNDS"),
                    help=argparse.SUPPRESS)   # the child process of bench_allocators
    ap.add_argument("--only", choices=["memory", "small_activations", "clusters", "start", "cifar"],
                    help="measure one section and merge it into the stored hessian.json")
    args = ap.parse_args()
    if args.product_times:
        state, n_train, n_batch, rounds = args.product_times
        print(json.dumps(product_times(state, int(n_train), int(n_batch), int(rounds))))
        return 0
    if args.from_json:
        res = json.loads((RESULTS / "hessian.json").read_text())
        (RESULTS / "hessian.md").write_text(write_report(res) + "\n")
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    n_train, n_batch = (2000, 256) if args.quick else (6000, 512)
    x, y, data_name = load_data(n_train)
    batch = (x[:n_batch], y[:n_batch])
    n_ds = 1024 if args.quick else 2048
    batches = [(x[i : i + n_batch], y[i : i + n_batch]) for i in range(0, n_ds, n_batch)]
    print("training models ...", flush=True)
    torch.manual_seed(0)  # the initial weights too, so reruns measure the same models
    model_cnn = train(cnn(), x, y, epochs=1 if args.quick else 3)
    model_mlp = train(mlp(), x, y, epochs=1 if args.quick else 5)
    env = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "pyhessian": getattr(pyhessian, "__version__", "0.1 (PyPI)") if pyhessian else
        "not installed",
        "python": platform.python_version(),
        "data": data_name,
        "batch": n_batch,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "ds_images": n_ds,
        "cnn_params": sum(p.numel() for p in model_cnn.parameters()),
        "cnn_last_params": sum(p.numel() for p in model_cnn[-1].parameters()),
        "mlp_params": sum(p.numel() for p in model_mlp.parameters()),
    }
    if args.only:
        sections = {
            "memory": (lambda: bench_memory(model_cnn, batch, [0, 1], [16, 10], 64),
                       lambda r: memory_report(r["memory"])),
            "small_activations": (lambda: bench_small_activations(model_mlp, batch, 200),
                                  lambda r: small_activations_report(r["small_activations"])),
            "clusters": (lambda: run_clusters(batch), lambda r: clusters_report(r["clusters"])),
            "start": (lambda: run_start(batch, model_cnn), lambda r: start_report(r["start"])),
            "cifar": (run_cifar, cifar_report),
        }
        measure, report = sections[args.only]
        return merge_section(args.only, measure, report, env["date"])
    res: dict = {"env": env}
    print("hvp strategies ...", flush=True)
    res["hvp"] = bench_hvp(model_cnn, *batch, repeats=3 if args.quick else 7)
    hv = res["hvp"]
    kept, fr = hv["double_backward_kept_ms"], hv["forward_over_reverse_ms"]
    rebuilt = hv["double_backward_rebuilt_ms"]
    print("memory settings ...", flush=True)
    res["allocators"] = bench_allocators(model_cnn, n_train, n_batch, 6 if args.quick else 16)
    print("small activations ...", flush=True)
    res["small_activations"] = bench_small_activations(model_mlp, batch, 40 if args.quick else 200)
    print("BatchNorm folding on CIFAR-shaped models ...", flush=True)
    res["norm_folding"] = bench_norm_folding(repeats=2 if args.quick else 7)
    res["decision"] = (
        f"double-backward with the graph kept ({kept:.1f} ms) beats forward-over-reverse "
        f"({fr:.1f} ms) by {fr / kept:.1f}x once the graph is built, so it is the default, "
        f"and the graphs are kept whenever they fit in memory; rebuilding one per product "
        f"costs {rebuilt:.1f} ms against forward-over-reverse's {fr:.1f} ms."
    )
    seeds = [0, 1] if args.quick else [0, 1, 2]
    print("top eigenvalue ...", flush=True)
    pyh_iter = 60 if args.quick else 150
    res["eigen_k1"] = bench_eigen(model_cnn, batch, seeds, 1, pyh_iter=pyh_iter)
    print("top eigenvalue of the last layer ...", flush=True)
    res["eigen_last"] = bench_eigen(model_cnn, batch, seeds, 1, pyh_iter=pyh_iter,
                                    params="last_layer")
    print("top eigenvalue of the MLP ...", flush=True)
    res["eigen_mlp"] = bench_eigen(model_mlp, batch, seeds, 1, pyh_iter=pyh_iter)
    print(f"top eigenvalue over {len(batches)} batches ...", flush=True)
    res["eigen_ds"] = bench_eigen(model_cnn, batches, seeds, 1, pyh_iter=pyh_iter)
    print(f"top eigenvalue of the last layer over {len(batches)} batches ...", flush=True)
    res["eigen_ds_last"] = bench_eigen(model_cnn, batches, seeds, 1, pyh_iter=pyh_iter,
                                       params="last_layer")
    print("top 5 eigenvalues ...", flush=True)
    res["eigen_k5"] = bench_eigen(model_cnn, batch, seeds[:2], 5, pyh_iter=0)
    print("top 5 eigenvalues of an untrained CNN ...", flush=True)
    res["clusters"] = run_clusters(batch, quick=args.quick)
    print("start vectors ...", flush=True)
    res["start"] = run_start(batch, model_cnn, quick=args.quick)
    print("trace ...", flush=True)
    budgets = [30, 90] if args.quick else [30, 60, 120, 240]
    res["trace"] = bench_trace(model_mlp, batch, budgets, list(range(8 if args.quick else 100)),
                               list(range(3 if args.quick else 20)))
    print("bounded memory ...", flush=True)
    res["memory"] = bench_memory(model_cnn, batch, seeds[:2], [16, 10], 32 if args.quick else 64)
    res["seconds"] = time.perf_counter() - t_start
    stored = RESULTS / "hessian.json"
    if stored.is_file() and not args.quick:
        # The CIFAR-scale section is measured on its own (--only cifar): keep it, dated.
        res["cifar"] = json.loads(stored.read_text()).get("cifar")
    report = write_report(res)
    print(report)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "hessian.md").write_text(report + "\n")
        (RESULTS / "hessian.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
