"""The two-spirals generator: deterministic per seed and equal to its written formula."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from flatminima.data.spirals import ARM_SCALE, THETA_MAX, make_spirals


def test_shapes_dtypes_and_labels() -> None:
    x, y = make_spirals(7, noise=0.5, seed=3)
    assert x.shape == (14, 2) and x.dtype == torch.float32
    assert y.shape == (14,) and y.dtype == torch.int64
    assert y.tolist() == [0] * 7 + [1] * 7


def test_same_seed_same_points_other_seed_other_points() -> None:
    a = make_spirals(50, noise=1.0, seed=11)
    b = make_spirals(50, noise=1.0, seed=11)
    c = make_spirals(50, noise=1.0, seed=12)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.allclose(a[0], c[0])


def test_matches_formula_with_the_documented_draws() -> None:
    # Rebuild the set with numpy from the same uniform / normal draws, written out independently.
    n, sigma, seed = 40, 0.7, 5
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(n, generator=gen, dtype=torch.float64).numpy()
    e = torch.randn(n, 2, generator=gen, dtype=torch.float64).numpy()
    theta = [math.sqrt(vi) * 600.0 * math.pi / 180.0 for vi in v]
    expected = []
    for t, (e1, e2) in zip(theta, e, strict=True):
        expected.append((-1.5 * t * math.cos(t) + sigma * e1, 1.5 * t * math.sin(t) + sigma * e2))
    expected += [(-px, -py) for px, py in expected]
    x, _ = make_spirals(n, noise=sigma, seed=seed)
    assert torch.allclose(x.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-5)


def test_noiseless_points_lie_on_the_spiral_with_sqrt_uniform_radius() -> None:
    x, y = make_spirals(2000, noise=0.0, seed=0)
    p = x[y == 0].double()
    r = p.norm(dim=1)
    theta = r / ARM_SCALE
    # On the arm: p = r * (-cos(theta), sin(theta)).
    on_arm = torch.stack([-r * theta.cos(), r * theta.sin()], dim=1)
    assert torch.allclose(p, on_arm, atol=1e-3)
    # Class 1 is the point reflection of class 0.
    assert torch.equal(x[y == 1], -x[y == 0])
    # theta / theta_max = sqrt(v) with v uniform, so (theta / theta_max)^2 is U(0, 1).
    u = ((theta / THETA_MAX) ** 2).numpy()
    assert u.max() <= 1.0 + 1e-6
    assert stats.kstest(u, "uniform").pvalue > 1e-3


def test_noise_has_the_requested_standard_deviation() -> None:
    clean, _ = make_spirals(5000, noise=0.0, seed=1)
    noisy, _ = make_spirals(5000, noise=0.8, seed=1)
    resid = (noisy - clean)[:5000].double()
    assert resid.std().item() == pytest.approx(0.8, rel=0.05)
    assert resid.mean().abs().item() < 0.05


@pytest.mark.parametrize("kw", [{"n_per_class": 0}, {"n_per_class": 2.5}, {"noise": -1.0},
                                {"noise": float("nan")}])
def test_bad_arguments_raise_value_error_naming_the_value(kw: dict) -> None:
    args = {"n_per_class": 5, "noise": 1.0, "seed": 0} | kw
    n = args.pop("n_per_class")
    with pytest.raises(ValueError, match="n_per_class|noise"):
        make_spirals(n, **args)
