"""Top eigenvalues of the loss Hessian (or GGN) by Lanczos."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatminima._checks import check_choice, check_optional_positive_int, check_positive_int
from flatminima._nn import LossFn
from flatminima._params import ParamSpec, measuring_mode
from flatminima.hessian._lanczos import rademacher
from flatminima.hessian._operator import CurvatureOperator, vectors_that_fit
from flatminima.hessian._restart import top_eigenvalues

STARTS = ("auto", "random", "gradient")


def default_max_basis(n: int, like: Tensor, k: int) -> int:
    """Lanczos vectors of ``n`` entries that fit, with the copy made at a restart (1.5x), a
    quarter of the memory available on ``like``'s device; at least ``2 k + 8``."""
    return max(2 * k + 8, vectors_that_fit(n, like, copies=1.5))


def eigenvalues(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    k: int = 1,
    *,
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
    max_iter: int = 200,
    which: str = "largest",
    curvature: str = "hessian",
    mode: str = "auto",
    train: bool = False,
    max_basis: int | None = None,
    starts: int = 1,
    start: str = "auto",
) -> Tensor:
    """The ``k`` largest (algebraic) eigenvalues of the loss Hessian (or GGN), largest first.

    Lanczos with full reorthogonalization (Lanczos 1950; Paige 1972) on the curvature of the
    size-weighted mean loss over ``data``, stopped once every wanted Ritz value ``theta`` has
    residual ``||H s - theta s|| <= tol * |theta|``: for a symmetric ``H`` some eigenvalue then
    lies within ``tol * |theta|`` of ``theta`` (Kahan's bound; Parlett, *The Symmetric
    Eigenvalue Problem*, Thm. 4.5.1; :mod:`flatminima.hessian._lanczos`), so every returned value
    is within relative ``tol`` of an eigenvalue.

    Args:
        model, loss_fn, data: the objective; ``data`` is one ``(x, y)`` batch or an iterable of
            batches, ``loss_fn(outputs, targets)`` a mean (``None``: cross-entropy).
        k: how many eigenvalues, ``1 <= k <=`` the number of selected parameters.
        params: the parameter subset (``None``: all trainable; a list of names, a predicate on
            the name, ``"last_layer"``, ``"weights"``, ``"no_norm"``).
        generator: draws the Rademacher start vectors.
        tol: relative residual tolerance, ``> 0``.
        max_iter: at most this many Lanczos steps (products) per run, ``>= k``.
        which: ``"largest"`` (algebraic) or ``"magnitude"`` (largest ``|lambda|``, still
            returned largest first).
        curvature: ``"hessian"`` or ``"ggn"`` (the Gauss-Newton matrix).
        mode: how products are computed (see :class:`flatminima.hessian.CurvatureOperator`).
        train: measure in train mode (default eval mode; buffers are restored either way).
        max_basis: at most this many Lanczos vectors are held; past that the iteration is
            thick-restarted (Wu & Simon 2000). Default: as many as fit a quarter of the memory
            available on the parameters' device, at least ``2 k + 8``.
        starts: independent runs; position by position the largest value found is returned.
        start: the first run's start vector, ``"auto"``, ``"random"`` or ``"gradient"``.

    Returns:
        A tensor of shape ``(k,)`` in the parameters' dtype, on the CPU, sorted descending. Each
        value is a lower bound of the eigenvalue of its rank (Cauchy interlacing; for
        ``which="magnitude"``, of its rank at its end of the spectrum).

    Raises:
        ValueError: ``k``, ``max_iter``, ``starts`` or ``max_basis`` not integers in range, ``k``
            above the number of selected parameters, ``max_iter < k``, ``tol <= 0``, an unknown
            ``start``, ``which``, ``curvature`` or ``mode``, a selection that matches nothing,
            empty ``data``, or a call inside ``torch.inference_mode()``.

    Example (the NRS paper's measure, Zhao & Zhang 2022, Table 3: the top eigenvalue of the last
    layer)::

        g = torch.Generator().manual_seed(0)
        lam = fm.hessian.eigenvalues(model, F.cross_entropy, loader, k=1, params="last_layer",
                                     generator=g)

    Notes:
        *Memory and restarts.* A thick restart (:mod:`flatminima.hessian._restart`) keeps the
        ``k + (max_basis - k) // 2`` best Ritz vectors and costs extra products only when the
        basis would have grown beyond the cap. The default cap counts the copy made at a restart:
        a small model never restarts, and a large one (a 36.5M-parameter WideResNet needs 146 MB
        per vector in float32) cannot run out of memory at ``max_iter``. Over several batches
        the gradient graphs of all of them are kept when they fit a quarter of the available
        memory (else rebuilt per product), and for a last layer (or any subset owned by the
        module that produces the output) the network below it runs once, not once per product:
        see :class:`flatminima.hessian.CurvatureOperator`.

        *Start vectors.* ``"random"`` is a Rademacher vector; ``"gradient"`` is that vector plus
        the loss gradient at half its length (the gradient of a trained network lies mostly in
        the top eigenspace, Gur-Ari et al. 2018; see :func:`start_vector`); ``"auto"`` is
        ``"gradient"`` for the single largest eigenvalue (``k=1``, ``which="largest"``) and
        ``"random"`` otherwise. At tol 1e-3 on the models of ``benchmarks/hessian.py``
        (``benchmarks/results/hessian.md``, section 2j) the gradient start took a trained CNN
        from 5-6 products to 4 for ``k=1`` (one batch and four; 8 of 8 start vectors) and its
        last layer from 9 to 8, left an MLP at 8 and a ResNet-18 at 6, all within 5e-5 of the
        eigenvalue, as were 8 of 8 runs on an untrained CNN whose top eigenvalues are 5% apart.
        For ``k=5`` it saved at most a product, and one of eight runs on the trained CNN skipped
        an eigenvalue that no random start skipped (the gradient favours some of the top
        eigenvectors, which then converge before an unfavoured one has appeared), hence random
        starts there. The stopping rule's guarantee and the lower bounds hold for any start
        vector; the random part keeps every eigenvector in this one, as in a random start.
        Further runs (``starts > 1``) always start from Rademacher vectors.

        *Repeated eigenvalues.* Lanczos from one start vector sees each distinct eigenvalue
        once. When its Krylov space closes (to within the tolerance: products carry rounding) it
        continues in the orthogonal complement, block after block while a copy found there
        could still change the wanted values, so the copies of a repeated eigenvalue are found
        where the space closes before the wanted values converge: an operator with few distinct
        eigenvalues, such as a linear last layer under mean squared error, whose Hessian is
        ``A (x) I_c`` (all three copies of each eigenvalue in float64; in float32 rounding kept
        that space from closing and the third copy was missed; a ``tol`` below the products'
        rounding, 1e-10 there, cannot tell a closed space from a converged one either). Over a
        spectrum with many distinct eigenvalues an exactly repeated top eigenvalue is reported
        once: no single-vector method can see its copies. Nearly repeated eigenvalues converge
        more slowly (as for any single-vector method).

        *Skipped eigenvalues.* What the stopping rule cannot certify (no Krylov method can) is
        that no eigenvalue was skipped: an eigenvector the start vector barely touches,
        typically one inside a tight cluster, may still be unseen when the wanted Ritz values
        have converged, and the next eigenvalue then takes its place. The error is always
        downwards: by Cauchy interlacing the ``i``-th largest Ritz value is at most the ``i``-th
        largest eigenvalue. On an untrained CNN of ``benchmarks/hessian.py`` (top eigenvalues
        9.81, 9.28, 9.15, 9.00, 8.95, 8.68; ``benchmarks/results/hessian.md``, section 2g) one
        of eight start vectors returned 8.68 in place of 8.95 for ``k=5``. ``starts=s`` repeats
        the run from ``s`` independent start vectors and returns, position by position, the
        largest value found (for ``which="magnitude"``, the largest positive and the most
        negative ones), which is still a lower bound of the same eigenvalue and misses only
        where every run missed.
    """
    k = check_positive_int(k, "k")
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol!r}")
    max_iter = check_positive_int(max_iter, "max_iter")
    starts = check_positive_int(starts, "starts")
    check_choice(start, STARTS, "start")
    max_basis = check_optional_positive_int(max_basis, "max_basis")
    with measuring_mode(model, train):
        op = CurvatureOperator(model, loss_fn, data, params, curvature=curvature, mode=mode)
        if k > op.size:
            raise ValueError(f"k={k} is larger than the number of selected parameters "
                             f"({op.size})")
        if max_iter < k:
            raise ValueError(f"max_iter={max_iter} must be at least k={k}")
        if max_basis is None:
            max_basis = default_max_basis(op.size, op.w0, k)
        elif max_basis < min(k + 2, op.size, max_iter):
            raise ValueError(f"max_basis={max_basis} must be at least k + 2 = {k + 2}")
        runs = []
        for run in range(starts):
            kind = resolve_start(start, k, which) if run == 0 else "random"
            values, _ = top_eigenvalues(op.matvec, start_vector(op, kind, generator), k, tol=tol,
                                        max_iter=max_iter, which=which, generator=generator,
                                        max_basis=max_basis)
            runs.append(values)
    values = merge_runs(runs, k, which)
    return values.to(op.w0.dtype).cpu()


def resolve_start(start: str, k: int, which: str) -> str:
    """``"auto"`` resolved: the gradient start for the single largest eigenvalue only."""
    if start != "auto":
        return start
    return "gradient" if k == 1 and which == "largest" else "random"


def start_vector(op: CurvatureOperator, kind: str, generator: torch.Generator | None) -> Tensor:
    """A Lanczos start vector: Rademacher ``r`` from ``generator`` (``kind="random"``) or
    ``r + (|r| / 2) g / |g|`` with ``g`` the loss gradient (``kind="gradient"``).

    The stopping rule's guarantee and Cauchy interlacing hold for any start vector; the random
    part keeps every eigenvector in this one (with probability one), as in a random start, and
    the gradient part weights the top eigenspace, where a trained network's gradient mostly
    lies. The gradient is free once double-backward products keep the gradient graphs (they are
    built here instead of at the first product). A zero gradient leaves ``r``.
    """
    r = rademacher(op.size, generator, op.w0)
    if kind == "random":
        return r
    g = op.gradient().to(r.dtype)
    norm = g.norm()
    if not torch.isfinite(norm) or norm == 0:
        return r
    return r + (0.5 * r.norm() / norm) * g


def merge_runs(runs: list[Tensor], k: int, which: str) -> Tensor:
    """The ``k`` wanted eigenvalues (largest first) from several Lanczos runs' Ritz values.

    Position by position the best lower bound: the ``i``-th largest Ritz value of a run is at
    most the ``i``-th largest eigenvalue, and its ``i``-th most negative one at least the ``i``-th
    smallest eigenvalue (Cauchy interlacing), so the maximum (minimum) over the runs is too. A run
    returns its wanted values, and every Ritz value beyond one of them at the same end of the
    spectrum is wanted as well, so position ``i`` at each end means the same in every run.
    """
    if which == "largest":
        tops = torch.stack([torch.sort(r.double(), descending=True).values[:k] for r in runs])
        return tops.max(0).values
    positive = _merge_end([torch.sort(r[r > 0].double(), descending=True).values for r in runs],
                          max)
    negative = _merge_end([torch.sort(r[r <= 0].double()).values for r in runs], min)
    both = torch.cat([positive, negative])
    wanted = both[torch.argsort(both.abs(), descending=True)[:k]]
    return torch.sort(wanted, descending=True).values


def _merge_end(ends: list[Tensor], best) -> Tensor:
    """Position by position, ``best`` (``max`` or ``min``) of the runs that reach that position
    (sorted lists of different lengths: the longest sets the length)."""
    length = max(e.numel() for e in ends)
    return torch.tensor([best(float(e[i]) for e in ends if e.numel() > i) for i in range(length)],
                        dtype=torch.float64)
