"""fm.volume: basin radii and log-volumes of quadratic basins against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatminima.volume as fv


class Point(nn.Module):
    """Outputs the parameter vector itself, so the loss is any function of ``w``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def quadratic(a: torch.Tensor, center: torch.Tensor, base: float):
    """``L(w) = base + 0.5 (w - c)^T A (w - c)``: minimum ``base`` at ``c``."""

    def loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        d = out - center
        return base + 0.5 * torch.einsum("bi,ij,bj->b", d, a, d).mean()

    return loss


DATA = (torch.zeros(3, 1), torch.zeros(3))


def test_radii_match_closed_form_along_each_direction():
    n, base = 6, 0.3
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 8.0, n, dtype=torch.float64)) @ q.T
    center = torch.randn(n, dtype=torch.float64, generator=g)
    res = fv.basin_radius(Point(center), quadratic(a, center, base), DATA, num_directions=5,
                          generator=torch.Generator().manual_seed(7), rtol=1e-6)
    # Rebuild the same directions: one Gaussian draw per direction, normalized.
    g = torch.Generator().manual_seed(7)
    for i in range(5):
        u = torch.randn(n, generator=g, dtype=torch.float64)
        u = u / u.norm()
        # base + 0.5 t^2 u^T A u = 2 base  =>  t = sqrt(2 base / u^T A u)
        expected = math.sqrt(2 * base / float(u @ a @ u))
        assert float(res.radii[i, 0]) == pytest.approx(expected, rel=2e-6)
        assert float(res.radii[i, 1]) == pytest.approx(expected, rel=2e-6)
    assert res.center_loss == pytest.approx(base)
    assert res.cutoff == pytest.approx(2 * base)
    assert not res.censored.any() and res.dim == n


def test_log_volume_isotropic_ball_is_exact():
    n, base, curv = 50, 1.0, 4.0
    center = torch.zeros(n, dtype=torch.float64)
    a = curv * torch.eye(n, dtype=torch.float64)
    lv = fv.log_volume(Point(center), quadratic(a, center, base), DATA, num_directions=3,
                       rtol=1e-8, generator=torch.Generator().manual_seed(1))
    radius = math.sqrt(2 * base / curv)
    exact = n / 2 * math.log(math.pi) - math.lgamma(n / 2 + 1) + n * math.log(radius)
    assert float(lv) == pytest.approx(exact, rel=1e-6)
    assert lv.num_censored == 0 and lv.radii.shape == (3, 2)


def test_log_volume_of_ellipse_converges_to_area():
    # {0.5 w^T A w <= base} is an ellipse with semi-axes sqrt(2 base / lambda_i): area pi r1 r2.
    base = 0.5
    a = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    center = torch.zeros(2, dtype=torch.float64)
    lv = fv.log_volume(Point(center), quadratic(a, center, base), DATA, num_directions=300,
                       generator=torch.Generator().manual_seed(2))
    area = math.pi * 1.0 * (1.0 / 3.0)
    # Monte-Carlo: r(u)^2 ranges over [1/9, 1]; 300 draws give a few percent standard error.
    assert math.exp(float(lv)) == pytest.approx(area, rel=0.1)


def test_log_volume_from_radii_in_log_space_survives_huge_dimension():
    dim = 10_000_000
    r = torch.tensor([1.0, 1.001, 0.5], dtype=torch.float64)
    got = fv.log_volume_from_radii(r, dim)
    # mean r^n is dominated by the largest radius: log(1.001^n / 3)
    expected = fv.log_unit_ball_volume(dim) + dim * math.log(1.001) - math.log(3)
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


def test_censored_rays_when_loss_never_reaches_cutoff():
    center = torch.zeros(3, dtype=torch.float64)

    def bounded(out, _y):  # saturates at 1.5 < cutoff 2.0
        return 1.0 + 0.5 * torch.tanh((out - center).pow(2).sum(dim=1)).mean()

    res = fv.basin_radius(Point(center), bounded, DATA, num_directions=2, max_radius=5.0,
                          generator=torch.Generator().manual_seed(0))
    assert res.censored.all()
    torch.testing.assert_close(res.radii, torch.full((2, 2), 5.0, dtype=torch.float64))


def test_filter_directions_and_bad_inputs():
    center = torch.ones(4, dtype=torch.float64)
    loss = quadratic(torch.eye(4, dtype=torch.float64), center, 0.2)
    res = fv.basin_radius(Point(center), loss, DATA, num_directions=2, directions="filter",
                          generator=torch.Generator().manual_seed(0))
    assert res.directions == "filter" and (res.radii > 0).all()
    with pytest.raises(ValueError, match="'cube'"):
        fv.basin_radius(Point(center), loss, DATA, directions="cube")
    with pytest.raises(ValueError, match="num_directions"):
        fv.basin_radius(Point(center), loss, DATA, num_directions=0)
    with pytest.raises(ValueError, match="num_directions"):
        fv.basin_radius(Point(center), loss, DATA, num_directions=True)
    with pytest.raises(ValueError, match="cutoff 0.1"):
        fv.basin_radius(Point(center), loss, DATA, cutoff=0.1)
    with pytest.raises(ValueError, match="empty"):
        fv.log_volume(Point(center), loss, [])
    with pytest.raises(ValueError, match="'v'"):
        fv.log_volume(Point(center), loss, DATA, params=["v"])
    with pytest.raises(ValueError, match="positive"):
        fv.log_volume_from_radii(torch.tensor([1.0, 0.0]), 3)
