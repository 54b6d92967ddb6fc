"""Stochastic trace estimation: Krylov-deflated Hutchinson, Hutch++ and Hutchinson.

Hutchinson (1989): for Rademacher ``z``, ``E[z^T H z] = tr(H)``, so the mean of ``m`` samples is
unbiased with variance ``2 ||H||_F^2 - 2 sum_i H_ii^2`` over ``m``; the reported error is the
sample standard deviation over ``sqrt(m)``.

The large eigenvalues dominate that variance. The deflated estimators take them out first: with an
orthonormal basis ``Q`` (``q`` columns) chosen independently of the probes ``g_j``,

    tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))
          ~= tr(Q^T H Q) + (1/r) sum_j g_j'^T H g_j',        g_j' = (I - QQ^T) g_j,

which is unbiased for *any* such ``Q``, with the variance of Hutchinson on the remainder only.
They differ in how ``Q`` is found:

* ``"hutch++"`` (Meyer, Musco, Musco, Woodruff 2021, Algorithm 1): ``Q = orth(H S)`` for a
  sketch ``S`` of ``m/3`` Rademacher columns; ``tr(Q^T H Q)`` costs another ``m/3`` products,
  the last ``m/3`` go to the remainder.
* ``"krylov"`` (default): ``Q`` is the Lanczos basis of ``m/2`` steps from one Rademacher start
  vector, in the spirit of Krylov-aware trace estimation (Chen & Hallman 2023). Lanczos already
  computes ``q_i^T H q_i`` (the diagonal of ``T``), so ``tr(Q^T H Q) = tr(T)`` costs nothing more
  and the other ``m/2`` products go to the remainder. A Krylov space of dimension ``q`` finds the
  extreme eigenvectors far better than a random sketch of ``q`` columns, so more of the variance
  is deflated with fewer products. Measured on a trained MLP's Hessian
  (``benchmarks/results/hessian.md``, section 3) it has the smallest error of the three at every
  budget.

The basis is held in memory (``m/2`` or ``m/3`` vectors of the parameter count, 14.6 GB for
``m = 200`` on a 36.5M-parameter model in float32), so it is capped at ``max_basis`` vectors, by
default as many as fit a quarter of the memory available (Hutch++ counting the copy its QR makes);
the products a cap saves go to the remainder, and the estimate stays unbiased.

For a spectrum without dominant eigenvalues nothing can be deflated and a deflated estimator pays
for its basis: its error is then up to ``sqrt(2)`` (krylov) or ``sqrt(3)`` (Hutch++) times
Hutchinson's. The reported error of a deflated estimate is the standard error of the remainder
term (the deflated part has no variance given ``Q``). When the basis spans everything (``m/2 >=
n`` for krylov, ``m/3 >= n`` for Hutch++) the estimate is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatminima._checks import check_choice, check_optional_positive_int, check_positive_int
from flatminima._nn import LossFn
from flatminima._params import ParamSpec, measuring_mode
from flatminima.hessian._lanczos import lanczos, rademacher
from flatminima.hessian._operator import CurvatureOperator, vectors_that_fit

TRACE_METHODS = ("krylov", "hutch++", "hutchinson")


class TraceEstimate(float):
    """A trace estimate: behaves as its float value, with ``std_error`` and ``num_matvecs``.

    ``value +- 2 * std_error`` is an approximate 95% interval; ``basis_size`` is the number of
    directions deflated exactly (0 for Hutchinson).
    """

    std_error: float
    num_matvecs: int
    method: str
    basis_size: int

    def __new__(cls, value: float, std_error: float, num_matvecs: int, method: str,
                basis_size: int = 0):
        obj = super().__new__(cls, value)
        obj.std_error = float(std_error)
        obj.num_matvecs = int(num_matvecs)
        obj.method = method
        obj.basis_size = int(basis_size)
        return obj

    @property
    def value(self) -> float:
        return float(self)

    def __repr__(self) -> str:
        return (f"TraceEstimate({float(self):.6g} +- {self.std_error:.3g}, "
                f"{self.method}, {self.num_matvecs} matvecs)")

    def __reduce__(self):
        return (TraceEstimate, (float(self), self.std_error, self.num_matvecs, self.method,
                                self.basis_size))


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


def _probe_samples(apply: _Blocked, n: int, r: int, generator, like: Tensor,
                   project: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``g'^T H g'`` for ``r`` Rademacher probes ``g`` (``g' = project(g)``, the part outside
    the deflation basis), drawn ``apply.block`` at a time so that only one block is ever held."""
    out = []
    for start in range(0, r, apply.block):
        g = rademacher(n, generator, like, rows=min(apply.block, r - start))
        if project is not None:
            g = project(g)
        out.append((g * apply(g)).sum(dim=1))
    return torch.cat(out)


def hutchinson(apply: _Blocked, n: int, m: int, generator, like: Tensor) -> TraceEstimate:
    samples = _probe_samples(apply, n, m, generator, like)
    return TraceEstimate(float(samples.double().mean()), _std_error(samples), m, "hutchinson")


def _deflated(top: float, rank: int, project: Callable[[Tensor], Tensor], used: int,
              apply: _Blocked, n: int, m: int, generator, like: Tensor, method: str
              ) -> TraceEstimate:
    """``tr(Q^T H Q) = top`` plus Hutchinson on the remainder (``project`` removes the ``rank``
    basis directions) with the ``m - used`` products left."""
    if rank >= n:
        return TraceEstimate(top, 0.0, used, method, rank)
    r = m - used
    if r <= 0:
        return TraceEstimate(top, math.inf, used, method, rank)
    samples = _probe_samples(apply, n, r, generator, like, project)
    return TraceEstimate(top + float(samples.double().mean()), _std_error(samples), m, method,
                         rank)


def hutchpp(apply: _Blocked, n: int, m: int, generator, like: Tensor, max_basis: int
            ) -> TraceEstimate:
    if m < 3:
        raise ValueError(f"hutch++ needs num_matvecs >= 3, got {m}")
    s_cols = min(m // 3, n, max_basis)
    if s_cols == 0:
        return hutchinson(apply, n, m, generator, like)
    # The sketch S is drawn a block at a time, so only Y = H S is ever held whole; its QR copy
    # is the peak (two sketches), and tr(Q^T H Q) is summed a block at a time.
    y = torch.cat([apply(rademacher(n, generator, like, rows=min(apply.block, s_cols - i)))
                   for i in range(0, s_cols, apply.block)])
    q = torch.linalg.qr(y.T).Q.T                           # orthonormal rows spanning range(Y)
    del y
    top = sum(float((q[i : i + apply.block] * apply(q[i : i + apply.block])).sum().double())
              for i in range(0, q.shape[0], apply.block))
    return _deflated(top, q.shape[0], lambda g: g - (g @ q.T) @ q, 2 * s_cols, apply, n, m,
                     generator, like, "hutch++")


def krylov(op: CurvatureOperator, apply: _Blocked, m: int, generator, like: Tensor,
           max_basis: int) -> TraceEstimate:
    if m < 2:
        raise ValueError(f"krylov needs num_matvecs >= 2, got {m}")
    n = op.size
    steps = min(m // 2, n, max_basis)
    if steps == 0:
        return hutchinson(apply, n, m, generator, like)
    start = rademacher(n, generator, like)
    # Fixed step count (tol=None); a closed Krylov space restarts from a fresh vector, so the
    # basis keeps growing (and spans everything, exactly, once it has n rows).
    res = lanczos(op.matvec, start, steps, tol=None, generator=generator)
    top = float(res.ritz.sum())                             # tr(T) = sum_i q_i^T H q_i
    return _deflated(top, res.basis.rows, res.basis.project_out, res.steps, apply, n, m,
                     generator, like, "krylov")


def trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    num_matvecs: int = 100,
    *,
    method: str = "krylov",
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    block: int | None = None,
    curvature: str = "hessian",
    mode: str = "auto",
    train: bool = False,
    max_basis: int | None = None,
) -> TraceEstimate:
    """Estimate ``tr(H)`` of the size-weighted mean loss with ``num_matvecs`` Hessian products.

    ``method`` is ``"krylov"`` (default: Lanczos-deflated Hutchinson), ``"hutch++"`` or
    ``"hutchinson"`` (see the module docstring); all draw Rademacher vectors from ``generator``.
    Returns a :class:`TraceEstimate` (a float with ``std_error``). Probes of the remainder are
    multiplied ``block`` at a time (default 1 for double-backward products, which gain nothing
    from blocks on CPU, else 8), so memory holds one block, not all ``num_matvecs``. The
    deflation basis has at most ``max_basis`` vectors (default: what fits a quarter of the
    available memory, see the module docstring); ``data``,
    ``params``, ``curvature`` and ``train`` as in :func:`flatminima.hessian.eigenvalues`. The
    NSO paper (Ju et al.) reports this trace.

    Example::

        t = fm.hessian.trace(model, F.cross_entropy, (x, y), num_matvecs=99)
        print(float(t), t.std_error)
    """
    check_choice(method, TRACE_METHODS, "trace method")
    num_matvecs = check_positive_int(num_matvecs, "num_matvecs")
    block = check_optional_positive_int(block, "block")
    max_basis = check_optional_positive_int(max_basis, "max_basis", minimum=0)
    with measuring_mode(model, train):
        op = CurvatureOperator(model, loss_fn, data, params, curvature=curvature, mode=mode)
        if max_basis is None:
            max_basis = vectors_that_fit(op.size, op.w0, 2.0 if method == "hutch++" else 1.0)
        if block is None:
            block = 1 if op.mode == "double_backward" and curvature == "hessian" else 8
        apply = _Blocked(op, block)
        if method == "hutchinson":
            return hutchinson(apply, op.size, num_matvecs, generator, op.w0)
        if method == "hutch++":
            return hutchpp(apply, op.size, num_matvecs, generator, op.w0, max_basis)
        return krylov(op, apply, num_matvecs, generator, op.w0, max_basis)
