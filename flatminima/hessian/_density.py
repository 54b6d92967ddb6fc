"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

The spectral density ``phi(t) = (1/n) sum_i delta(t - lambda_i)`` is smoothed with a Gaussian of
width ``sigma`` and estimated as in Ghorbani, Krishnan & Xiao (2019) and Golub & Meurant: for a
unit random vector ``v``, ``v^T f(H) v = sum_i (v^T u_i)^2 f(lambda_i)``, and ``m`` Lanczos steps
from ``v`` give the Gauss quadrature ``sum_j tau_j f(theta_j)`` with nodes ``theta_j`` (Ritz
values) and weights ``tau_j = S[0, j]^2``, exact for polynomials ``f`` of degree ``< 2m``.
Averaging over ``num_runs`` start vectors (Rademacher, so ``E[(v^T u_i)^2] = 1/n``) estimates
``phi``.

Full reorthogonalization holds ``num_steps`` vectors of the parameter count (9.3 GB for 64 steps
on a 36.5M-parameter model in float32). Without it the recurrence holds two; the converged Ritz
values then reappear as copies that share their weight, and the quadrature stays as accurate
(Greenbaum 1989; measured in ``tests/test_hessian.py``), so ``reorthogonalize`` defaults to full
reorthogonalization only when the basis fits a quarter of the available memory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from flatminima._checks import check_positive_int
from flatminima._nn import LossFn
from flatminima._params import ParamSpec, measuring_mode
from flatminima.hessian._lanczos import lanczos, rademacher
from flatminima.hessian._operator import CurvatureOperator, vectors_that_fit


def density_nodes(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    *,
    num_steps: int = 64,
    num_runs: int = 1,
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    curvature: str = "hessian",
    mode: str = "auto",
    train: bool = False,
    reorthogonalize: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """SLQ nodes and weights, each ``(num_runs, num_steps)`` float64 (weights of a run sum to 1).

    A run whose Krylov space closes early (fewer distinct eigenvalues than ``num_steps``) pads
    with zero-weight nodes. ``reorthogonalize``: see the module docstring (``None``: full
    reorthogonalization when ``num_steps`` vectors fit a quarter of the available memory).
    """
    num_steps = check_positive_int(num_steps, "num_steps")
    num_runs = check_positive_int(num_runs, "num_runs")
    nodes = torch.zeros(num_runs, num_steps, dtype=torch.float64)
    weights = torch.zeros(num_runs, num_steps, dtype=torch.float64)
    with measuring_mode(model, train):
        op = CurvatureOperator(model, loss_fn, data, params, curvature=curvature, mode=mode)
        if reorthogonalize is None:
            reorthogonalize = min(num_steps, op.size) <= vectors_that_fit(op.size, op.w0)
        for r in range(num_runs):
            start = rademacher(op.size, generator, op.w0)
            # No restart on breakdown: a fresh vector would break the quadrature's link to v.
            res = lanczos(op.matvec, start, num_steps, tol=None, restart_on_breakdown=False,
                          reorthogonalize=reorthogonalize)
            m = res.ritz.numel()
            nodes[r, :m] = res.ritz
            nodes[r, m:] = res.ritz[-1] if m else 0.0
            weights[r, :m] = res.weights
    return nodes, weights


def density(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    *,
    num_steps: int = 64,
    num_runs: int = 1,
    grid_size: int = 1000,
    sigma: float | None = None,
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    curvature: str = "hessian",
    mode: str = "auto",
    train: bool = False,
    reorthogonalize: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Smoothed spectral density of the loss Hessian: ``(grid, density)``, both ``(grid_size,)``.

    ``density`` integrates to 1 over ``grid`` (up to the tails cut off at the grid ends). The
    grid spans the extreme nodes plus ``5 sigma``; ``sigma`` defaults to 1% of the node range.
    Costs ``num_steps * num_runs`` Hessian-vector products.

    Example::

        grid, dens = fm.hessian.density(model, F.cross_entropy, (x, y), num_steps=80)
        plt.semilogy(grid, dens + 1e-7)
    """
    grid_size = check_positive_int(grid_size, "grid_size", minimum=2)
    if sigma is not None and not (sigma > 0):
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    nodes, weights = density_nodes(
        model, loss_fn, data, num_steps=num_steps, num_runs=num_runs, params=params,
        generator=generator, curvature=curvature, mode=mode, train=train,
        reorthogonalize=reorthogonalize,
    )
    return smooth_density(nodes, weights, grid_size=grid_size, sigma=sigma)


def smooth_density(
    nodes: Tensor, weights: Tensor, *, grid_size: int = 1000, sigma: float | None = None
) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed density ``mean_runs sum_j tau_j N(t; theta_j, sigma^2)`` on a grid."""
    lo, hi = float(nodes.min()), float(nodes.max())
    span = hi - lo
    if sigma is None:
        sigma = 0.01 * span if span > 0 else max(abs(hi), 1.0) * 1e-3
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    diff = grid[:, None, None] - nodes[None]                      # (G, runs, m)
    kernel = torch.exp(-0.5 * (diff / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    dens = (kernel * weights[None]).sum(dim=2).mean(dim=1)
    return grid, dens
