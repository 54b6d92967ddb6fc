"""The perturbation samplers do what their formulas say."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import flatminima as fm

PARAMS = {
    "conv": torch.randn(6, 3, 3, 3, generator=torch.Generator().manual_seed(0)),
    "bias": torch.randn(6, generator=torch.Generator().manual_seed(1)),
}


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_sphere_filter_relative_has_exact_filter_norms():
    u = fm.noise.sample(PARAMS, 0.1, distribution="sphere", scale="filter", generator=gen())
    rows = u["conv"].reshape(6, -1).norm(dim=1)
    torch.testing.assert_close(rows, 0.1 * PARAMS["conv"].reshape(6, -1).norm(dim=1))
    # 1-D tensors: each entry is its own filter, so |u_i| = rho * |w_i|.
    torch.testing.assert_close(u["bias"].abs(), 0.1 * PARAMS["bias"].abs())


def test_global_ball_is_inside_and_fills_the_ball():
    w = {"a": torch.ones(3)}
    radii = []
    for s in range(4000):
        u = fm.noise.sample(w, 2.0, distribution="ball", scale="global", relative=False,
                            generator=gen(s))
        radii.append(float(u["a"].norm()))
    radii = torch.tensor(radii)
    assert radii.max() <= 2.0 + 1e-6
    # Uniform in a 3-ball: P(r <= 2t) = t^3, so the median radius is 2 * 0.5^(1/3).
    assert abs(float(radii.median()) - 2 * 0.5 ** (1 / 3)) < 0.03


def test_layer_relative_ball_radius_scales_with_weight_norm():
    w = {"a": torch.full((50,), 3.0)}
    u = fm.noise.sample(w, 0.2, distribution="ball", scale="layer", generator=gen())
    assert float(u["a"].norm()) <= 0.2 * float(w["a"].norm()) + 1e-6


def test_gaussian_element_absolute_has_sigma_std():
    w = {"a": torch.zeros(200_000)}
    u = fm.noise.sample(w, 0.03, distribution="gaussian", scale="element", relative=False,
                        generator=gen())
    assert abs(float(u["a"].std()) - 0.03) < 0.03 * 0.01
    assert abs(float(u["a"].mean())) < 0.03 * 0.01


def test_uniform_element_absolute_is_in_the_box_with_uniform_variance():
    w = {"a": torch.zeros(200_000)}
    u = fm.noise.sample(w, 0.5, distribution="uniform", scale="element", relative=False,
                        generator=gen())
    assert float(u["a"].abs().max()) <= 0.5
    assert abs(float(u["a"].var()) - 0.5**2 / 3) < 0.002


def test_gaussian_filter_relative_std_is_gamma_times_filter_norm():
    w = {"a": torch.randn(4, 20_000, generator=gen(3))}
    u = fm.noise.sample(w, 0.01, distribution="gaussian", scale="filter", generator=gen())
    torch.testing.assert_close(u["a"].std(dim=1), 0.01 * w["a"].norm(dim=1), rtol=0.02, atol=0)


def test_zero_radius_gives_zeros_and_same_generator_same_draw():
    u0 = fm.noise.sample(PARAMS, 0.0, generator=gen())
    assert all(float(t.abs().max()) == 0.0 for t in u0.values())
    a = fm.noise.Sampler(0.1, "gaussian", "layer")(PARAMS, gen(7))
    b = fm.noise.Sampler(0.1, "gaussian", "layer")(PARAMS, gen(7))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_float64_params_get_float64_noise():
    w = {"a": torch.randn(5, 4, dtype=torch.float64)}
    for dist in fm.noise.DISTRIBUTIONS:
        for scale in fm.noise.SCALES:
            u = fm.noise.sample(w, 0.1, distribution=dist, scale=scale, generator=gen())
            assert u["a"].dtype == torch.float64 and u["a"].shape == w["a"].shape


@pytest.mark.parametrize(
    "kw, match",
    [({"distribution": "cauchy"}, "distribution"), ({"scale": "row"}, "scale"),
     ({"radius": -1.0}, "radius"), ({"radius": math.inf}, "radius")],
)
def test_bad_sampler_arguments(kw, match):
    args = {"radius": 0.1, **kw}
    with pytest.raises(ValueError, match=match):
        fm.noise.Sampler(**args)


def test_named_trainable_params_selections():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 8, 8))
    assert set(fm.noise.named_trainable_params(model, "weights")) == {"0.weight", "3.weight"}
    assert set(fm.noise.named_trainable_params(model, "no_norm")) == {
        "0.weight", "0.bias", "3.weight", "3.bias"}
    assert list(fm.noise.named_trainable_params(model, ["3.bias"])) == ["3.bias"]
    with pytest.raises(ValueError, match="no trainable parameter"):
        fm.noise.named_trainable_params(model, ["fc.weight"])
