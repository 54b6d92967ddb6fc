"""Lanczos iteration with full reorthogonalization and a residual-based stopping rule.

For a symmetric operator ``A`` (n x n) and a unit start vector ``q_1``, Lanczos builds an
orthonormal basis ``Q_m = [q_1..q_m]`` of the Krylov space ``span{q_1, A q_1, ..., A^{m-1} q_1}``
and the tridiagonal ``T_m = Q_m^T A Q_m`` (diagonal ``alpha``, off-diagonal ``beta``). With
``T_m = S diag(theta) S^T`` the Ritz pair ``(theta_i, Q_m s_i)`` has residual

    || A Q_m s_i - theta_i Q_m s_i || = beta_m * |S[m, i]|,

and by the Bauer-Fike / Kahan bound some eigenvalue of ``A`` lies within that residual of
``theta_i`` (Parlett, *The Symmetric Eigenvalue Problem*, Thm. 4.5.1). So stopping once every
wanted Ritz value has ``residual <= tol * |theta_i|`` *guarantees* an eigenvalue within relative
``tol`` (the actual error is usually far smaller, about ``residual^2 / gap``). Power iteration
(PyHessian) stops when the estimate changes by less than ``tol`` between steps, which bounds
nothing and converges at rate ``lambda_2 / lambda_1`` instead of Lanczos' Chebyshev rate.

When the Krylov space closes (``beta ~ 0``: an invariant subspace was found) the iteration
continues from a fresh random vector orthogonal to ``Q``; ``T`` then becomes block-diagonal. A
space that closes only to within the tolerance (``beta`` above the rounding floor, as float64
products of a network leave it, but below half of every wanted value's tolerance) is treated
the same way: its coupling ``beta`` is dropped from ``T`` and added to every later residual
bound, so the guarantee still holds (:meth:`StoppingRule.closes`).
This finds eigenvalues the first start vector had no component along (repeated eigenvalues).
A fresh random vector has (with probability one) a component along every eigenvector left in the
complement, so its block sees the largest of them before it closes too: once a block closes
without changing the wanted Ritz values, nothing wanted is left and the iteration stops (a
low-rank operator would otherwise close a one-vector block at every remaining step). While such a
block is open, convergence also waits for its own leading Ritz value: until that has converged, an
eigenvalue of the complement larger than the wanted ones could still appear. And if that value is
a copy of one found before and larger than the k-th wanted value, the block must close first:
further copies would displace the k-th value, and this block sees its eigenvalue only once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


class LanczosBasis:
    """The orthonormal Lanczos vectors, stored in blocks that are filled in place.

    Appending a row never copies the earlier ones (a growing ``torch.cat`` would copy the whole
    basis at every step and briefly hold it twice, which matters at millions of parameters).
    A new block has as many rows as the basis already has, between 8 and 64, so unused
    preallocated rows never exceed the rows in use; with ``capacity`` set (the most rows the
    caller will append), no block reaches past it, so memory is bounded by ``capacity`` rows.
    """

    def __init__(self, first: Tensor, capacity: int | None = None) -> None:
        self.n = first.numel()
        self.rows = 0
        self.capacity = capacity
        self._blocks: list[Tensor] = []
        self._free = 0
        self.append(first)

    @classmethod
    def from_rows(cls, rows: Tensor, capacity: int | None = None) -> LanczosBasis:
        """A basis whose first ``rows.shape[0]`` rows are ``rows`` (taken, not copied)."""
        basis = cls.__new__(cls)
        basis.n = rows.shape[1]
        basis.rows = rows.shape[0]
        basis.capacity = capacity
        basis._blocks = [rows]
        basis._free = 0
        return basis

    def allocated(self) -> int:
        """Rows allocated, used or not."""
        return sum(b.shape[0] for b in self._blocks)

    def append(self, q: Tensor) -> None:
        if self._free == 0:
            size = min(64, max(8, self.rows))
            if self.capacity is not None:
                size = max(1, min(size, self.capacity - self.rows))
            self._blocks.append(q.new_empty(size, self.n))
            self._free = size
        block = self._blocks[-1]
        block[block.shape[0] - self._free] = q
        self._free -= 1
        self.rows += 1

    def _filled(self) -> list[Tensor]:
        out = self._blocks[:-1]
        last = self._blocks[-1]
        return [*out, last[: last.shape[0] - self._free]]

    def row(self, i: int) -> Tensor:
        i = i % self.rows
        for block in self._filled():
            if i < block.shape[0]:
                return block[i]
            i -= block.shape[0]
        raise IndexError(i)

    def project_out(self, w: Tensor) -> Tensor:
        """``w - Q^T Q w`` (one classical Gram-Schmidt pass) for a vector or rows ``(b, n)``."""
        blocks = self._filled()
        if w.dim() == 1:
            coeffs = [b @ w for b in blocks]
            return w - sum(b.T @ c for b, c in zip(blocks, coeffs, strict=True))
        coeffs = [w @ b.T for b in blocks]
        return w - sum(c @ b for b, c in zip(blocks, coeffs, strict=True))

    def coefficients(self, w: Tensor) -> Tensor:
        """``Q w``: the coordinates of the vector ``w`` along the ``rows`` basis vectors."""
        return torch.cat([b @ w for b in self._filled()])

    def combine(self, c: Tensor) -> Tensor:
        """``Q^T c``: the vector with coordinates ``c``."""
        out, i = None, 0
        for b in self._filled():
            part = c[i : i + b.shape[0]] @ b
            out = part if out is None else out + part
            i += b.shape[0]
        return out

    def rotated(self, s: Tensor) -> Tensor:
        """``S^T Q``, rows ``sum_i S[i, j] q_i`` for the columns of ``s`` (``rows x r``): a new
        ``(r, n)`` tensor, so the peak memory is ``rows + r`` vectors."""
        out, i = None, 0
        for b in self._filled():
            part = s[i : i + b.shape[0]].T @ b
            out = part if out is None else out.add_(part)
            i += b.shape[0]
        return out

    def dense(self) -> Tensor:
        """The rows ``q_1..q_m`` as one ``(m, n)`` tensor (a copy)."""
        return torch.cat(self._filled())


@dataclass
class LanczosResult:
    """Ritz values (ascending), first-row weights ``S[0, i]^2``, residuals, the step count and
    the orthonormal basis ``Q`` (rows ``q_1..q_m``; ``tr(Q^T A Q) = tr(T) = sum(ritz)``)."""

    ritz: Tensor          # (m,) float64, ascending
    weights: Tensor       # (m,) float64: |e_1^T s_i|^2, the SLQ quadrature weights
    residuals: Tensor     # (m,) float64: beta_m |e_m^T s_i|
    steps: int
    converged: bool
    basis: LanczosBasis | None   # rows q_1..q_m, start vector's dtype; None if not kept


def rademacher(n: int, generator: torch.Generator | None, like: Tensor, rows: int = 0) -> Tensor:
    """Entries +-1 with equal probability, drawn on the generator's device then moved."""
    device = generator.device if generator is not None else like.device
    shape = (rows, n) if rows else (n,)
    z = torch.randint(0, 2, shape, generator=generator, device=device)
    return (z * 2 - 1).to(device=like.device, dtype=like.dtype)


def _tridiagonal(alpha: list[float], beta: list[float]) -> Tensor:
    m = len(alpha)
    t = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(beta[: m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return t


def ritz_step(t: Tensor, b: float, eps: float) -> tuple[Tensor, Tensor, Tensor, bool, float]:
    """The Ritz pairs of the projected matrix ``t`` after a step whose new residual vector has
    norm ``b``: ``(theta ascending, s, residuals, breakdown, floor)``.

    ``residuals[i] = b |e_m^T s_i|``. ``b`` at or below ``floor = 100 eps max|theta|`` (about the
    rounding noise of a product) is a breakdown: the Krylov space is invariant and the Ritz pairs
    of this block are exact, so their residuals are 0.
    """
    theta, s = torch.linalg.eigh(t)
    floor = 100 * eps * (float(theta.abs().max()) if theta.numel() else 0.0)
    breakdown = b <= floor or b == 0.0
    residuals = (0.0 if breakdown else b) * s[-1].abs()
    return theta, s, residuals, breakdown, floor


def _orthogonalize(w: Tensor, basis: LanczosBasis) -> Tensor:
    # Classical Gram-Schmidt twice ("twice is enough", Giraud et al. 2005): keeps the basis
    # orthogonal to working precision, so no spurious copies of converged Ritz values appear.
    for _ in range(2):
        w = basis.project_out(w)
    return w


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    max_steps: int,
    *,
    k: int = 1,
    tol: float | None = None,
    which: str = "largest",
    generator: torch.Generator | None = None,
    restart_on_breakdown: bool = True,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
    reorthogonalize: bool = True,
) -> LanczosResult:
    """Run up to ``max_steps`` Lanczos steps from ``start``.

    With ``tol`` set, stop as soon as the ``k`` wanted Ritz values (``which="largest"``
    algebraic, or ``"magnitude"``) all have ``residual <= max(tol * |theta|, floor)``, where
    ``floor = 100 * eps * max|theta|`` is about the rounding noise of a product in the working
    precision: eigenvalues far below the top one could otherwise never converge. With
    ``tol=None`` run all steps (SLQ wants a fixed number of nodes). ``callback(step, ritz,
    residuals)`` is called after every step (progress, convergence studies).

    ``reorthogonalize=False`` runs the bare three-term recurrence and holds two vectors instead
    of the basis (``basis`` is then ``None``, and a breakdown cannot restart). Orthogonality is
    lost as Ritz values converge, which makes copies ("ghosts") of them appear; the Gauss
    quadrature built from ``T`` stays accurate nonetheless (Greenbaum 1989; Knizhnerman 1996),
    which is all that stochastic Lanczos quadrature needs.
    """
    if not reorthogonalize and restart_on_breakdown:
        raise ValueError("a restart on breakdown needs the basis: pass reorthogonalize=True")
    n = start.numel()
    max_steps = min(max_steps, n)
    q = start / start.norm()
    basis = LanczosBasis(q, capacity=max_steps) if reorthogonalize else None
    previous: Tensor | None = None
    alpha: list[float] = []
    beta: list[float] = []
    eps = torch.finfo(start.dtype).eps
    converged = False
    rule = StoppingRule(k, which, tol)
    ritz = weights = residuals = torch.zeros(0, dtype=torch.float64)
    for step in range(1, max_steps + 1):
        w = matvec(q)
        a = float(torch.dot(q, w))
        w = w - a * q
        if step > 1 and beta[-1] != 0.0:
            w = w - beta[-1] * previous
        if basis is not None:
            w = _orthogonalize(w, basis)
        b = float(w.norm())
        alpha.append(a)
        theta, s, residuals, breakdown, floor = ritz_step(_tridiagonal(alpha, beta), b, eps)
        residuals = residuals + rule.dropped
        ritz, weights = theta, s[0] ** 2
        if callback is not None:
            callback(step, theta, residuals)
        # On a breakdown the Ritz values are exact but copies of a repeated eigenvalue can still
        # hide in the orthogonal complement: look there before accepting convergence. So also
        # when the block is invariant only to within the tolerance (see StoppingRule.closes).
        closed = rule.closes(theta, b, floor, breakdown)
        done, look = rule.check(step, theta, s, residuals, closed,
                                restart_on_breakdown and step < n, floor)
        if done:
            converged = True
            break
        if step == max_steps:
            break
        if breakdown or (closed and look):
            if breakdown and (not restart_on_breakdown or step >= n):
                converged = True
                break
            # Continue in the orthogonal complement from a fresh vector (the residual vector of
            # a nearly closed block is rounding, which need not touch the copies left there):
            # T gets a zero off-diagonal entry, and a dropped coupling b above the rounding
            # floor is added to every later residual bound (see StoppingRule.closes).
            new = _orthogonalize(rademacher(n, generator, start), basis)
            if float(new.norm()) <= eps:
                converged = True
                break
            if not breakdown:
                rule.dropped += b
            previous, q = q, new / new.norm()
            rule.open_row = step
            beta.append(0.0)
        else:
            previous, q = q, w / b
            beta.append(b)
        if basis is not None:
            basis.append(q)
    return LanczosResult(ritz, weights, residuals, len(alpha), converged, basis)


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    k = min(k, theta.numel())
    if which == "largest":
        return torch.argsort(theta, descending=True)[:k]
    if which == "magnitude":
        return torch.argsort(theta.abs(), descending=True)[:k]
    raise ValueError(f"unknown which={which!r}; choose 'largest' or 'magnitude'")


class StoppingRule:
    """When to stop, shared by plain and restarted Lanczos (see the module docstring): every
    wanted Ritz value within ``max(tol |theta|, floor)`` of its residual; after a breakdown, the
    block opened in the complement must first find its own leading Ritz value, and a block that
    closes without changing the wanted values ends the search. ``tol=None``: never stop early.
    """

    def __init__(self, k: int, which: str, tol: float | None) -> None:
        self.k, self.which, self.tol = k, which, tol
        self.closed: Tensor | None = None    # wanted Ritz values when the last block closed
        self.open_row: int | None = None     # first basis row of the block opened last
        self.dropped = 0.0                   # couplings dropped at closures (see closes)

    def closes(self, theta: Tensor, b: float, floor: float, breakdown: bool) -> bool:
        """Whether the block just closed: a breakdown, or a residual vector so short that
        dropping it keeps every wanted value within its tolerance. Products in float64 carry
        rounding well above ``floor`` (2e-12 relative on a small MLP's last layer), so an
        exactly repeated eigenvalue would otherwise be reported once and its copies never
        looked for. Dropping the coupling ``b`` makes ``T`` the projection of ``A + E`` with
        ``||E|| <= b``, so each Ritz pair's residual for ``A`` grows by at most ``b``: the
        dropped couplings are summed in ``dropped`` and added to every residual, and may use
        at most half of the smallest wanted tolerance (``b`` below that is not a closure: the
        iteration then goes on with the residual vector, exactly, and copies may be missed).
        """
        if breakdown:
            return True
        if self.tol is None or theta.numel() == 0:
            return False
        wanted = theta[_wanted(theta, self.k, self.which)]
        return self.dropped + b <= 0.5 * self.tol * float(wanted.abs().min())

    def check(self, step: int, theta: Tensor, s: Tensor, residuals: Tensor, breakdown: bool,
              complement_left: bool, floor: float) -> tuple[bool, bool]:
        """``(converged, look in the complement)`` after a step."""
        look = breakdown and complement_left
        if self.tol is None:
            return False, look
        if look:
            now = torch.sort(theta[_wanted(theta, self.k, self.which)]).values
            settled = (self.closed is not None and self.closed.numel() == now.numel()
                       and bool(self._within(now - self.closed, now, floor).all()))
            self.closed, look = now, not settled
        if look or step < self.k:
            return False, look
        return self._wanted_converged(theta, s, residuals, floor, breakdown), look

    def _within(self, err: Tensor, theta: Tensor, floor: float) -> Tensor:
        return err.abs() <= torch.clamp(self.tol * theta.abs(), min=floor)

    def _wanted_converged(self, theta: Tensor, s: Tensor, residuals: Tensor, floor: float,
                          breakdown: bool) -> bool:
        idx = _wanted(theta, self.k, self.which)
        if not bool(self._within(residuals[idx], theta[idx], floor).all()):
            return False
        if breakdown or self.open_row is None:
            return True
        # The open block's Ritz vectors are those of T that live mostly in its rows.
        in_block = s[self.open_row:].pow(2).sum(0) > 0.5
        members = torch.nonzero(in_block).flatten()
        if members.numel() == 0:
            return True
        best = members[_wanted(theta[members], 1, self.which)]
        if not bool(self._within(residuals[best], theta[best], floor).all()):
            return False
        # A leading value that repeats one found before it is a copy of a repeated eigenvalue:
        # further copies hide where this block, which sees each distinct eigenvalue once, cannot
        # look. They matter only if they would push out the k-th wanted value; then the block
        # has to close and open the next one before the search can end.
        lead = theta[best]
        if not bool(self._within(theta[~in_block] - lead, lead, floor).any()):
            return True
        kth = theta[idx[-1]]
        if self.which == "magnitude":
            lead, kth = lead.abs(), kth.abs()
        return bool((lead - kth <= torch.clamp(self.tol * lead.abs(), min=floor)).all())
