"""Basin radius along random directions and the Monte-Carlo log-volume of the basin.

Huang, Emam, Goldblum, Fowl, Terry, Huang & Goldstein, "Understanding Generalization through
Visualizations" (2020): the *basin* of a minimizer ``w`` is the set of nearby points whose
train loss stays below a cutoff (default twice the loss at ``w``); its *radius* along a
direction ``u`` is the distance from ``w`` to the first point where the loss crosses the cutoff.
Small differences in radius become huge differences in volume in high dimension, which is why
they estimate the volume by Monte-Carlo integration over directions.

For a star-shaped basin with radius function ``r(u)`` on the unit sphere ``S^{n-1}``,

    vol = integral_{S^{n-1}} r(u)^n / n  du  =  V_n * E_u[r(u)^n],   V_n = pi^{n/2} / Gamma(n/2+1),

with ``u`` uniform on the sphere (``V_n`` is the unit ball's volume). With ``n`` in the millions
``r^n`` overflows any float, so the estimate is computed in log space:

    log vol ~= log V_n + logsumexp_i(n log r_i) - log M.

The estimate is dominated by the largest sampled radius (it is a lower-variance statement about
``max_i r_i`` than about the mean); it is what the paper reports, and it is comparable between
minima of the same architecture. Directions are isotropic (``u = z / ||z||``, ``z ~ N(0, I)``);
both ``u`` and ``-u`` are measured (each is uniform on the sphere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatminima._checks import check_choice, check_positive_int
from flatminima._nn import LossFn, gaussian_like, model_device
from flatminima._params import ParamSpec, as_batches, select_params
from flatminima.landscape import PointEvaluator, normalize_direction

DIRECTIONS = ("sphere", "filter")


@dataclass
class BasinRadius:
    """Radii ``(num_directions, 2)``: column 0 along ``+u``, column 1 along ``-u``.

    ``censored`` marks rays whose loss stayed below the cutoff up to ``max_radius`` (their
    radius is reported as ``max_radius``, a lower bound). ``directions`` is ``"sphere"`` (radii
    are Euclidean distances in parameter space) or ``"filter"`` (radii are coordinates along
    filter-normalized directions, Li et al. 2018, comparable across differently scaled models).
    """

    radii: Tensor
    censored: Tensor
    center_loss: float
    cutoff: float
    dim: int
    directions: str


def _unit_directions(
    selected: dict[str, Tensor], m: int, kind: str, generator: torch.Generator | None
) -> list[dict[str, Tensor]]:
    out = []
    for _ in range(m):
        raw = gaussian_like(selected, generator)
        if kind == "filter":
            d = normalize_direction(raw, selected, norm="filter", bias_bn="filter")
        else:
            norm = torch.sqrt(sum((t.double() ** 2).sum() for t in raw.values()))
            d = {n: t / norm.to(t.dtype) for n, t in raw.items()}
        out.append(d)
    return out


def basin_radius(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    *,
    num_directions: int = 10,
    cutoff: float | None = None,
    cutoff_factor: float = 2.0,
    directions: str = "sphere",
    max_radius: float | None = None,
    rtol: float = 1e-3,
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    train: bool = False,
) -> BasinRadius:
    """Distance from ``w`` to where the loss first reaches ``cutoff`` along random rays.

    ``cutoff`` defaults to ``cutoff_factor`` (2) times the loss at ``w``. For each of
    ``num_directions`` random directions ``u`` both rays ``w + t u`` and ``w - t u`` are
    scanned on a geometric grid of ``t`` (factor 2 between points, from ``max_radius * 2^-30``
    to ``max_radius``), then the first crossing is refined by bisection to relative ``rtol``.
    Every scan and bisection step evaluates all rays in one batched pass. ``max_radius``
    defaults to ``10 * ||w||`` for ``"sphere"`` directions and 10 for ``"filter"`` ones.
    A bump narrower than the grid spacing before the first grid crossing can be missed.

    Example::

        r = fm.volume.basin_radius(model, F.cross_entropy, train_batches, num_directions=20)
        r.radii.mean()
    """
    num_directions = check_positive_int(num_directions, "num_directions")
    check_choice(directions, DIRECTIONS, "directions")
    if not (cutoff_factor > 1.0):
        raise ValueError(f"cutoff_factor must be > 1, got {cutoff_factor!r}")
    if not (0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    batches = as_batches(data, model_device(model))
    # The example input finds the last layer in execution order (a head registered first).
    selected = {n: p.detach()
                for n, p in select_params(model, params, batches[0][0]).items()}
    dim = sum(p.numel() for p in selected.values())
    dirs = _unit_directions(selected, num_directions, directions, generator)
    ev = PointEvaluator(model, loss_fn, batches, list(selected), chunk_size=chunk_size,
                        train=train)
    center = float(ev.run(lambda a, b: ev.w0[None], 1)[0][0])
    if cutoff is None:
        if not center > 0:
            raise ValueError(f"loss at the center is {center!r}: pass an explicit cutoff")
        cutoff = cutoff_factor * center
    if not cutoff > center:
        raise ValueError(f"cutoff {cutoff!r} must exceed the center loss {center:.6g}")
    if max_radius is None:
        w_norm = math.sqrt(sum(float((p.double() ** 2).sum()) for p in selected.values()))
        max_radius = 10.0 * w_norm if directions == "sphere" else 10.0
        max_radius = max_radius if max_radius > 0 else 10.0
    if not (max_radius > 0 and math.isfinite(max_radius)):
        raise ValueError(f"max_radius must be a positive finite number, got {max_radius!r}")

    # Ray r = 2 * i + s runs along (+1, -1)[s] * u_i; each pass evaluates a set of rays at
    # their own distances, built chunk by chunk as w0 + t_r u_r (no dense coordinate matrix).
    m = num_directions
    umat = torch.stack([ev.flat.flatten(d).to(ev.w0) for d in dirs])   # (m, n)
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def loss_at(t: Tensor, mask: Tensor) -> Tensor:
        """Loss on the rays in ``mask`` at their own ``t``, shape (m, 2), NaN elsewhere."""
        idx = mask.reshape(-1).nonzero().squeeze(1)
        step = (t * signs).reshape(-1)[idx].to(ev.w0)
        rows = idx // 2
        out = torch.full((2 * m,), math.nan, dtype=torch.float64)
        out[idx] = ev.run(lambda a, b: ev.w0 + step[a:b, None] * umat[rows[a:b]],
                          idx.numel())[0]
        return out.reshape(m, 2)

    lo = torch.zeros(m, 2, dtype=torch.float64)
    hi = torch.full((m, 2), math.inf, dtype=torch.float64)
    for t in (max_radius * 2.0 ** torch.arange(-30, 1, dtype=torch.float64)).tolist():
        open_rays = torch.isinf(hi)
        if not open_rays.any():
            break
        crossed = (loss_at(torch.full((m, 2), t, dtype=torch.float64), open_rays) >= cutoff)
        hi[open_rays & crossed] = t
        lo[open_rays & ~crossed] = t
    censored = torch.isinf(hi)
    while True:
        active = ~censored & ((hi - lo) > rtol * hi)
        if not active.any():
            break
        mid = 0.5 * (lo + hi)
        above = loss_at(mid, active) >= cutoff
        hi = torch.where(active & above, mid, hi)
        lo = torch.where(active & ~above, mid, lo)
    radii = torch.where(censored, torch.full_like(lo, max_radius), hi)
    # Report the distance: for filter directions the coordinate t itself (see BasinRadius).
    return BasinRadius(radii, censored, center, float(cutoff), dim, directions)


class LogVolume(float):
    """A log-volume (natural log) that is a float, with its radii, dimension and censoring."""

    radii: Tensor
    dim: int
    num_censored: int

    def __new__(cls, value: float, radii: Tensor, dim: int, num_censored: int):
        obj = super().__new__(cls, value)
        obj.radii, obj.dim, obj.num_censored = radii, dim, num_censored
        return obj

    def __repr__(self) -> str:
        return (f"LogVolume({float(self):.6g}, dim={self.dim}, rays={self.radii.numel()}, "
                f"censored={self.num_censored})")


def log_unit_ball_volume(dim: int) -> float:
    """``log(pi^{n/2} / Gamma(n/2 + 1))``."""
    return 0.5 * dim * math.log(math.pi) - math.lgamma(0.5 * dim + 1.0)


def log_volume_from_radii(radii: Tensor, dim: int) -> float:
    """``log V_n + log mean_i r_i^n`` in log space, for radii along uniform random directions."""
    dim = check_positive_int(dim, "dim")
    r = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
    if r.numel() == 0:
        raise ValueError("radii is empty")
    if (r <= 0).any() or not torch.isfinite(r).all():
        raise ValueError("radii must be positive and finite")
    log_mean = float(torch.logsumexp(dim * torch.log(r), dim=0)) - math.log(r.numel())
    return log_unit_ball_volume(dim) + log_mean


def log_volume(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: object,
    *,
    num_directions: int = 10,
    cutoff: float | None = None,
    cutoff_factor: float = 2.0,
    max_radius: float | None = None,
    rtol: float = 1e-3,
    params: ParamSpec = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    train: bool = False,
) -> LogVolume:
    """Monte-Carlo log-volume of the basin (Huang et al. 2020), natural log.

    Measures :func:`basin_radius` along ``num_directions`` isotropic directions (both signs)
    and returns ``log V_n + log mean r^n`` over the selected ``n`` parameters. Censored rays
    count at ``max_radius`` (so the result is then a lower bound; see ``num_censored``).

    Example::

        lv = fm.volume.log_volume(model, F.cross_entropy, train_batches, num_directions=50)
        print(float(lv) / math.log(10), "orders of magnitude")
    """
    res = basin_radius(
        model, loss_fn, data, num_directions=num_directions, cutoff=cutoff,
        cutoff_factor=cutoff_factor, directions="sphere", max_radius=max_radius, rtol=rtol,
        params=params, generator=generator, chunk_size=chunk_size, train=train,
    )
    value = log_volume_from_radii(res.radii, res.dim)
    return LogVolume(value, res.radii, res.dim, int(res.censored.sum()))
