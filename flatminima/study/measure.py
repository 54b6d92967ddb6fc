"""Geometry of one trained minimum: rollouts, basin radius, log-volume, margins.

Everything here is measured on the *clean training loss* (cross-entropy on the training set,
without the poison term), as in Huang et al. (2019): a poisoned model is a minimizer of the training
loss too, and the question is how wide its basin in that loss is.

* **Rollouts**: the train loss along ``w + t d`` for random filter-normalized directions ``d``
  (Li et al. 2018: each output unit's slice of ``d`` has the norm of the same slice of ``w``), so
  ``t`` is a relative step that compares models of different weight scale.
* **Basin radius** along a direction: the distance ``t`` at which the train loss first crosses the
  cutoff (:func:`flatminima.volume.basin_radius`, filter-normalized directions).
* **Log-volume**: the Monte-Carlo estimate ``log V_n + log mean_i r_i^n`` over isotropic directions
  in the ``n``-dimensional weight space (:func:`flatminima.volume.basin_radius` with sphere
  directions, :func:`flatminima.volume.log_volume_from_radii`), reported in base 10 ("orders of
  magnitude"), with a bootstrap standard error over the sampled directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import landscape, volume


@dataclass
class BasinStats:
    """Basin geometry of one model at one cutoff (see the module doc)."""

    cutoff: float
    center_loss: float
    radius_mean: float          # mean filter-normalized radius over rays (both signs)
    radius_std: float
    radius_censored: int        # rays still below the cutoff at max_radius
    log10_volume: float         # log10 of the basin volume (isotropic directions, Euclidean)
    log10_volume_se: float      # bootstrap standard error of log10_volume over directions
    volume_censored: int
    dim: int
    weight_norm: float
    radii: list[float]          # filter-normalized radius of every ray (direction i: 2i, 2i+1)


def rollouts(model: nn.Module, x: Tensor, y: Tensor, *, num_directions: int, span: float,
             num_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train loss along ``num_directions`` filter-normalized random lines, ``t`` in [-span, span].

    Returns ``(t, loss)`` with ``loss`` of shape ``(num_directions, num_points)``. All weight sets
    go through :func:`flatminima.landscape.evaluate` in batched passes.
    """
    gen = torch.Generator().manual_seed(seed)
    dirs = [landscape.random_direction(model, norm="filter", bias_bn="filter", generator=gen)
            for _ in range(num_directions)]
    t = torch.linspace(-span, span, num_points, dtype=torch.float64)
    coords = torch.zeros(num_directions * num_points, num_directions, dtype=torch.float64)
    for k in range(num_directions):
        coords[k * num_points:(k + 1) * num_points, k] = t
    loss, _ = landscape.evaluate(model, F.cross_entropy, (x, y), dirs, coords)
    return t.numpy(), loss.reshape(num_directions, num_points).numpy()


def _bootstrap_se(radii: Tensor, dim: int, seed: int, reps: int = 200) -> float:
    """Standard error of log10 volume under resampling the directions (with replacement)."""
    r = radii.reshape(radii.shape[0], -1)                       # (directions, 2 signs)
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(reps):
        idx = torch.randint(0, r.shape[0], (r.shape[0],), generator=gen)
        vals.append(volume.log_volume_from_radii(r[idx], dim) / math.log(10))
    return float(np.std(vals, ddof=1))


def basin_stats(model: nn.Module, x: Tensor, y: Tensor, *, cutoff: float, num_directions: int,
                seed: int) -> BasinStats:
    """Filter-normalized radius and isotropic log-volume of the basin ``{train loss < cutoff}``.

    A model whose train loss is already above ``cutoff`` has no such basin: NaNs are returned.
    """
    with torch.no_grad():
        center = float(F.cross_entropy(model.eval()(x), y))
    w_norm = math.sqrt(sum(float((p.detach().double() ** 2).sum()) for p in model.parameters()))
    dim = sum(p.numel() for p in model.parameters())
    if not center < cutoff:
        nan = float("nan")
        return BasinStats(cutoff, center, nan, nan, 0, nan, nan, 0, dim, w_norm, [])
    gen = torch.Generator().manual_seed(seed)
    filt = volume.basin_radius(model, F.cross_entropy, (x, y), num_directions=num_directions,
                               cutoff=cutoff, directions="filter", generator=gen, rtol=1e-2)
    iso = volume.basin_radius(model, F.cross_entropy, (x, y), num_directions=num_directions,
                              cutoff=cutoff, directions="sphere", generator=gen, rtol=1e-3)
    log10_vol = volume.log_volume_from_radii(iso.radii, iso.dim) / math.log(10)
    return BasinStats(
        cutoff=cutoff, center_loss=center,
        radius_mean=float(filt.radii.mean()), radius_std=float(filt.radii.std()),
        radius_censored=int(filt.censored.sum()),
        log10_volume=log10_vol, log10_volume_se=_bootstrap_se(iso.radii, iso.dim, seed),
        volume_censored=int(iso.censored.sum()), dim=iso.dim, weight_norm=w_norm,
        radii=filt.radii.reshape(-1).tolist())


__all__ = ["BasinStats", "rollouts", "basin_stats"]
