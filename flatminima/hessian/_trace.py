"""Stochastic trace estimation: Hutchinson and Hutch++.

Hutchinson (1989): for Rademacher ``z``, ``E[z^T H z] = tr(H)``, so the mean of ``m`` samples is
unbiased with variance ``2 ||H||_F^2 - 2 sum_i H_ii^2`` over ``m``; the reported error is the
sample standard deviation over ``sqrt(m)``.

Hutch++ (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1) spends a third of the ``m`` products
on a sketch ``Y = H S`` (``S``: ``m/3`` Rademacher columns), takes ``Q = orth(Y)``, computes the
top part ``tr(Q^T H Q)`` exactly with another third and the rest by Hutchinson on the projected
remainder ``(I - QQ^T) H (I - QQ^T)``:

    tr(H) ~= tr(Q^T H Q) + (1/r) sum_j g_j'^T H g_j',   g_j' = (I - QQ^T) g_j.

The large eigenvalues, which dominate Hutchinson's variance, land in ``Q``; for the fast-decaying
spectra of trained networks the error drops from ``O(1/sqrt(m))`` to ``O(1/m)``. The reported
error is the standard error of the remainder term (the sketched part has no variance given Q).
When ``m/3 >= n`` the sketch spans everything and the estimate is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatminima._params import ParamSpec, measuring_mode
from flatminima.hessian._lanczos import rademacher
from flatminima.hessian._operator import CurvatureOperator, LossFn

TRACE_METHODS = ("hutch++", "hutchinson")


class TraceEstimate(float):
    """A trace estimate: behaves as its float value, with ``std_error`` and ``num_matvecs``.

    ``value +- 2 * std_error`` is an approximate 95% interval.
    """

    std_error: float
    num_matvecs: int
    method: str

    def __new__(cls, value: float, std_error: float, num_matvecs: int, method: str):
        obj = super().__new__(cls, value)
        obj.std_error = float(std_error)
        obj.num_matvecs = int(num_matvecs)
        obj.method = method
        return obj

    @property
    def value(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return (f"TraceEstimate({float(self):.6g} +- {self.std_error:.3g}, "
                f"{self.method}, {self.num_matvecs} matvecs)")

    def __reduce__(self):
        return (TraceEstimate, (float(self), self.std_error, self.num_matvecs, self.method))


@dataclass
class _Blocked:
    """Apply the operator to blocks of at most ``block`` vectors (bounded memory)."""

    op: CurvatureOperator
    block: int

    def __call__(self, vs: Tensor) -> Tensor:
        return torch.cat([self.op.matmat(vs[i : i + self.block])
                          for i in range(0, vs.shape[0], self.block)])


def _std_error(samples: Tensor) -> float:
    if samples.numel() < 2:
        return math.inf
    return float(samples.double().std(unbiased=True)) / math.sqrt(samples.numel())


def hutchinson(apply: _Blocked, n: int, m: int, generator, like: Tensor) -> TraceEstimate:
    z = rademacher(n, generator, like, rows=m)
    samples = (z * apply(z)).sum(dim=1)
    return TraceEstimate(float(samples.double().mean()), _std_error(samples), m, "hutchinson")


def hutchpp(apply: _Blocked, n: int, m: int, generator, like: Tensor) -> TraceEstimate:
    if m < 3:
        raise ValueError(f"hutch++ needs num_matvecs >= 3, got {m}")
    s_cols = min(m // 3, n)
    s = rademacher(n, generator, like, rows=s_cols)
    y = apply(s)                                           # (s_cols, n): rows are H s_j
    q = torch.linalg.qr(y.T.double()).Q.T.to(like.dtype)   # orthonormal rows spanning range(Y)
    top = float((q * apply(q)).sum().double())              # tr(Q^T H Q)
    r = m - 2 * s_cols
    if s_cols >= n or r <= 0:
        return TraceEstimate(top, 0.0 if s_cols >= n else math.inf, 2 * s_cols, "hutch++")
    g = rademacher(n, generator, like, rows=r)
    g = g - (g @ q.T) @ q                                   # project out range(Q)
    samples = (g * apply(g)).sum(dim=1)
    value = top + float(samples.double().mean())
    return TraceEstimate(value, _std_error(samples), m, "hutch++")


def trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    num_matvecs: int = 100,
    *,
    method: str = "hutch++",
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    curvature: str = "hessian",
    mode: str = "auto",
    train: bool = False,
) -> TraceEstimate:
    """Estimate ``tr(H)`` of the size-weighted mean loss with ``num_matvecs`` Hessian products.

    ``method`` is ``"hutch++"`` (default) or ``"hutchinson"``; both draw Rademacher probes from
    ``generator``. Returns a :class:`TraceEstimate` (a float with ``std_error``). Products are
    computed ``block`` vectors per pass. ``data``, ``params``, ``curvature`` and ``train`` as in
    :func:`flatminima.hessian.eigenvalues`. The NSO paper (Ju et al.) reports this trace.

    Example::

        t = fm.hessian.trace(model, F.cross_entropy, (x, y), num_matvecs=99)
        print(float(t), t.std_error)
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"unknown trace method {method!r}; choose one of {TRACE_METHODS}")
    if not isinstance(num_matvecs, int) or isinstance(num_matvecs, bool) or num_matvecs < 1:
        raise ValueError(f"num_matvecs must be a positive integer, got {num_matvecs!r}")
    if block is not None and (not isinstance(block, int) or isinstance(block, bool) or block < 1):
        raise ValueError(f"block must be a positive integer, got {block!r}")
    with measuring_mode(model, train):
        op = CurvatureOperator(model, loss_fn, data, params, curvature=curvature, mode=mode)
        if block is None:
            block = 1 if op.mode == "double_backward" and curvature == "hessian" else 8
        apply = _Blocked(op, block)
        if method == "hutchinson":
            return hutchinson(apply, op.size, num_matvecs, generator, op.w0)
        return hutchpp(apply, op.size, num_matvecs, generator, op.w0)
