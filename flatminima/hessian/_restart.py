"""Thick-restart Lanczos: the wanted eigenvalues with a basis of at most ``max_basis`` vectors.

Plain Lanczos with full reorthogonalization keeps every basis vector: ``max_iter`` vectors of the
parameter count, 14.6 GB for 100 steps of a 36.5M-parameter WideResNet-28-10 in float32. Thick
restart (Wu & Simon, *SIAM J. Matrix Anal. Appl.* 22(2), 2000) bounds that: when the basis is
full, with ``T = Q A Q^T = S diag(theta) S^T`` and last residual vector ``w`` (norm ``b``), it
keeps the ``l`` Ritz vectors ``y_i = Q^T s_i`` nearest the wanted end and continues from
``q = w / b``. Those satisfy exactly

    A y_i = theta_i y_i + (b S[m, i]) q,

so the projected matrix of the new basis ``[y_1..y_l, q, A q, ...]`` is ``diag(theta)`` bordered by
the coupling row ``b S[m, :]``, followed by the usual tridiagonal part. Here it is formed the way
Arnoldi forms it, from the full Gram-Schmidt coefficients ``Q A q_j`` of every new product (which
also performs the reorthogonalization), so the relation ``A Q^T = Q^T T + w e_m^T`` holds at every
step and the residual of a Ritz pair is ``b |S[m, i]|``, the same guaranteed stopping rule as
:func:`flatminima.hessian._lanczos.lanczos`. The Krylov information along the kept Ritz vectors
survives a restart, so convergence degrades gracefully as ``max_basis`` shrinks (measured in
``tests/test_hessian_restart.py``); with ``max_basis >= max_steps`` nothing is ever restarted.

Keeping ``l = k + (m - k) // 2`` vectors is the choice Wu & Simon found robust: fewer throws away
Krylov information, more leaves too few new steps per cycle.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from flatminima.hessian._lanczos import (
    LanczosBasis,
    LanczosResult,
    StoppingRule,
    _wanted,
    lanczos,
    rademacher,
    ritz_step,
)


def _orthogonalized(w: Tensor, basis: LanczosBasis) -> tuple[Tensor, Tensor]:
    """``w`` minus its projection on the basis (classical Gram-Schmidt twice) and the summed
    coefficients ``Q w`` in float64."""
    total = None
    for _ in range(2):
        c = basis.coefficients(w)
        w = w - basis.combine(c)
        total = c.double() if total is None else total + c.double()
    return w, total


def kept_count(max_basis: int, k: int) -> int:
    """Ritz vectors kept at a restart: ``k + (m - k) // 2``, at least ``k + 1``, below ``m``."""
    return min(max_basis - 1, max(k + 1, k + (max_basis - k) // 2))


def restarted_lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    max_steps: int,
    max_basis: int,
    *,
    k: int = 1,
    tol: float,
    which: str = "largest",
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> LanczosResult:
    """Up to ``max_steps`` products, never more than ``max_basis`` basis vectors held.

    Stops once the ``k`` wanted Ritz values have ``residual <= max(tol * |theta|, floor)`` as
    :func:`~flatminima.hessian._lanczos.lanczos` does; ``callback(step, ritz, residuals)`` after
    every product. With ``max_basis >= min(max_steps, n)`` it *is* that function; otherwise
    ``max_steps`` may exceed ``n`` (a restart discards information, so ``n`` steps need not
    suffice). The result's ``weights`` are those of the last cycle's projected matrix (no
    quadrature meaning after a restart) and ``basis`` the vectors held at the end.
    """
    n = start.numel()
    if max_basis >= min(max_steps, n):
        return lanczos(matvec, start, max_steps, k=k, tol=tol, which=which,
                       generator=generator, callback=callback)
    if max_basis < k + 2:
        raise ValueError(f"max_basis={max_basis} must be at least k + 2 = {k + 2}")
    keep = kept_count(max_basis, k)
    eps = torch.finfo(start.dtype).eps
    q = start / start.norm()
    basis = LanczosBasis(q, capacity=max_basis)
    t = torch.zeros(max_basis, max_basis, dtype=torch.float64)
    j = 0                                       # row of q in the basis
    converged = False
    rule = StoppingRule(k, which, tol)
    theta = s = residuals = torch.zeros(0, dtype=torch.float64)
    for step in range(1, max_steps + 1):
        w, h = _orthogonalized(matvec(q), basis)
        t[j, : j + 1] = h
        t[: j + 1, j] = h
        b = float(w.norm())
        m = j + 1
        theta, s, residuals, breakdown, floor = ritz_step(t[:m, :m], b, eps)
        residuals = residuals + rule.dropped
        if callback is not None:
            callback(step, theta, residuals)
        # As in plain Lanczos: after a breakdown, copies of a repeated eigenvalue can hide in the
        # orthogonal complement, so look there before accepting convergence.
        closed = rule.closes(theta, b, floor, breakdown)
        done, look = rule.check(step, theta, s, residuals, closed, basis.rows < n, floor)
        if done:
            converged = True
            break
        if step == max_steps:
            break
        if breakdown or (closed and look):
            new, _ = _orthogonalized(rademacher(n, generator, start), basis)
            if float(new.norm()) <= eps:
                converged = True
                break
            if not breakdown:       # a near closure: its coupling is dropped (see closes)
                rule.dropped += b
            q = new / new.norm()
            rule.open_row = m
        else:
            q = w / b
        if m == max_basis:
            # Thick restart: keep the Ritz vectors nearest the wanted end; their projected
            # matrix is diagonal, and the coupling to q comes with q's first product. Those of
            # an open block go last, so that its rows stay contiguous.
            idx = _wanted(theta, keep, which)
            if rule.open_row is not None and rule.open_row < m:
                member = s[rule.open_row:, idx].pow(2).sum(0) > 0.5
                idx = torch.cat([idx[~member], idx[member]])
                rule.open_row = int((~member).sum())
            elif rule.open_row is not None:
                rule.open_row = len(idx)            # q itself opens the block
            rows = basis.rotated(s[:, idx].to(start.dtype))
            del basis
            basis = LanczosBasis.from_rows(rows, capacity=max_basis)
            t.zero_()
            t[: len(idx), : len(idx)] = torch.diag(theta[idx])
            j = len(idx)
        else:
            j += 1
        basis.append(q)
    weights = s[0] ** 2 if s.numel() else s
    return LanczosResult(theta, weights, residuals, step, converged, basis)


def top_eigenvalues(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    k: int,
    *,
    tol: float,
    max_iter: int,
    which: str = "largest",
    generator: torch.Generator | None = None,
    max_basis: int | None = None,
) -> tuple[Tensor, LanczosResult]:
    """The ``k`` wanted eigenvalues (largest first) and the Lanczos run that found them; with
    ``max_basis`` below ``max_iter``, thick-restarted so that at most that many vectors are held
    (see above)."""
    res = restarted_lanczos(matvec, start, max_iter, max_iter if max_basis is None else max_basis,
                            k=k, tol=tol, which=which, generator=generator)
    if not res.converged:
        warnings.warn(
            f"Lanczos did not reach tol={tol} within max_iter={max_iter} steps; the "
            f"largest residual is {float(res.residuals.max()):.3g}",
            RuntimeWarning,
            stacklevel=3,
        )
    idx = _wanted(res.ritz, k, which)
    return res.ritz[idx], res
