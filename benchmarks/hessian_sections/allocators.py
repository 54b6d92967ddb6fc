"""Section 1, memory settings: the products of section 1 under each CPU memory setting.

Much of a product's time on CPU is the kernel handing out fresh pages for new activations. The
settings of :data:`ALLOCATORS` are environment variables read when the process starts, so each
runs in a child process: ``benchmarks/hessian.py --product-times STATE N_TRAIN N_BATCH ROUNDS``
(a hidden option) loads the CNN saved at ``STATE`` and prints :func:`product_times` as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _fixtures import alternating, cnn, load_data

from flatminima.hessian._operator import CurvatureOperator
from hessian_sections.pyhessian_adapter import pyh_mod, pyhessian, pyhessian_for

# The script whose --product-times option runs product_times in the child process.
DRIVER = Path(__file__).resolve().parents[1] / "hessian.py"


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
    names = {k for _, env in ALLOCATORS.values() for k in env}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        state = os.path.join(tmp, "cnn.pt")
        torch.save(model.state_dict(), state)
        for key, (_, extra) in ALLOCATORS.items():
            env = {k: v for k, v in os.environ.items() if k not in names}
            env.update(extra)
            done = subprocess.run(
                [sys.executable, str(DRIVER), "--product-times", state, str(n_train),
                 str(n_batch), str(rounds)], env=env, capture_output=True, text=True, check=True)
            out[key] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {key}: {out[key]}", flush=True)
    return out


def report(alloc: dict | None) -> list[str]:
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
