"""The two-spirals ("swiss roll") toy set of the generalization-visualization study.

Huang et al., "Understanding Generalization through Visualizations" (2019) train a small MLP on two
interleaved spirals to show that a well-generalizing network has a wide-margin decision boundary
and a flat, high-volume basin. Their generator draws, for each of ``n`` points,

    theta = sqrt(v) * theta_max,           v ~ U(0, 1),   theta_max = 600 degrees = 10 pi / 3
    p     = (-a * theta * cos(theta) + sigma * e1,  a * theta * sin(theta) + sigma * e2)
            with a = 1.5 and e1, e2 ~ N(0, 1),

labels the points ``p`` class 0 and their mirror images ``-p`` (a point reflection through the
origin, noise included) class 1. The square root makes the density of ``theta`` grow like ``theta``,
which is how the arc length of the spiral grows, so points are spread evenly along each arm rather
than bunched at its centre. With ``sigma = 1`` (the study's default) neighbouring arms, which are
``a * pi ~ 4.7`` apart, barely overlap, so a good classifier reaches close to 100% test accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Largest angle of a spiral arm, in radians (600 degrees: one and two thirds turns).
THETA_MAX = 600.0 * math.pi / 180.0
#: Radial growth per radian: radius = ARM_SCALE * theta.
ARM_SCALE = 1.5


def make_spirals(n_per_class: int, *, noise: float, seed: int) -> tuple[Tensor, Tensor]:
    """Draw the two-spirals set: ``n_per_class`` points per class, class 1 mirroring class 0.

    Args:
        n_per_class: points per class (the study uses 200, i.e. 400 in all, split half/half).
        noise: standard deviation ``sigma`` of the isotropic Gaussian noise added to each point
            (the study uses 1.0).
        seed: seed of the private ``torch.Generator`` (CPU); the same seed gives the same points.

    Returns:
        ``(x, y)``: ``x`` float32 of shape ``[2 n, 2]`` (first the ``n`` class-0 points, then their
        mirror images), ``y`` int64 of shape ``[2 n]`` (``n`` zeros then ``n`` ones).

    The draws are made in float64 in this order, so the set can be rebuilt from its formula:
    ``v = rand(n)``, then ``e = randn(n, 2)``, both from ``torch.Generator().manual_seed(seed)``.

    Example::

        x, y = make_spirals(200, noise=1.0, seed=0)   # 400 points, |x| up to about 16
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"n_per_class must be a positive integer, got {n_per_class!r}")
    if not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.rand(n_per_class, generator=gen, dtype=torch.float64)
    eps = torch.randn(n_per_class, 2, generator=gen, dtype=torch.float64)
    theta = v.sqrt() * THETA_MAX
    arm = torch.stack([-ARM_SCALE * theta * theta.cos(), ARM_SCALE * theta * theta.sin()], dim=1)
    p = arm + noise * eps
    x = torch.cat([p, -p]).to(torch.float32)
    y = torch.cat([torch.zeros(n_per_class, dtype=torch.int64),
                   torch.ones(n_per_class, dtype=torch.int64)])
    return x, y


__all__ = ["make_spirals", "THETA_MAX", "ARM_SCALE"]
