"""Section 1, small activations: the path without zero tensors for ReLU and max-pooling against
PyTorch's double-backward on the MLP's small activations, the measurement behind
``flatminima.hessian._piecewise.MIN_NUMEL``.

``benchmarks/hessian.py --only small_activations`` measures it on its own and merges it into the
stored results.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _fixtures import alternating

from flatminima.hessian._operator import CurvatureOperator


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


def report(small: dict | None) -> list[str]:
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
