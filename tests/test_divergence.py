"""fm.divergence.model_divergence against a direct computation with the same perturbations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima.noise as fn
from flatminima.divergence import model_divergence


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4)).double()
    m[1].running_mean.uniform_(-0.3, 0.3)
    return m.eval()


def data(n: int = 24, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,),
                                                                             generator=g)


def direct_kl(model: nn.Module, x: torch.Tensor, u: dict[str, torch.Tensor]) -> float:
    """Reference: perturb a copy in place, KL(p_w || p_{w+u}) written out per sample."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        p = F.softmax(model.eval()(x), dim=1)
        for n, t in m.named_parameters():
            t.add_(u[n])
        q = F.softmax(m(x), dim=1)
    return float((p * (p.log() - q.log())).sum(dim=1).mean())


def test_equals_direct_average_over_the_same_default_draws():
    model, (x, y) = net(), data()
    got = model_divergence(model, (x, y), 0.1, 5, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    params = {n: p.detach() for n, p in model.named_parameters()}
    ref = [direct_kl(model, x, fn.sample(params, 0.1, distribution="ball", scale="filter",
                                         generator=g)) for _ in range(5)]
    assert got == pytest.approx(sum(ref) / 5, rel=1e-10)
    assert got > 0


def test_injected_noise_and_chunking_and_batches():
    model, (x, y) = net(1), data(30)
    fixed_u = {n: 0.05 * torch.ones_like(p) for n, p in model.named_parameters()}

    def noise(params, generator):
        return {n: fixed_u[n] for n in params}

    ref = direct_kl(model, x, fixed_u)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    for chunk in (1, 2, None):
        got = model_divergence(model, batches, 0.0, 3, noise=noise, chunk_size=chunk)
        assert got == pytest.approx(ref, rel=1e-10)


def test_zero_radius_gives_zero_and_subset_only_perturbs_subset():
    model, batch = net(2), data()
    assert model_divergence(model, batch, 0.0, 2) == 0.0
    g = torch.Generator().manual_seed(0)
    got = model_divergence(model, batch, 0.2, 1, params=["3.weight"], scale="layer",
                           distribution="gaussian", generator=g)
    g = torch.Generator().manual_seed(0)
    u = fn.sample({"3.weight": model[3].weight.detach()}, 0.2, distribution="gaussian",
                  scale="layer", generator=g)
    full_u = {n: u.get(n, torch.zeros_like(p)) for n, p in model.named_parameters()}
    assert got == pytest.approx(direct_kl(model, batch[0], full_u), rel=1e-10)


def test_model_untouched_and_mode_restored():
    model, batch = net(3), data()
    model.train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    model_divergence(model, batch, 0.1, 3, generator=torch.Generator().manual_seed(0))
    model_divergence(model, batch, 0.1, 2, train=True, generator=torch.Generator().manual_seed(0))
    assert model.training
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


def test_bad_inputs():
    model, batch = net(), data()
    with pytest.raises(ValueError, match="rho"):
        model_divergence(model, batch, -0.1, 2)
    with pytest.raises(ValueError, match="num_samples"):
        model_divergence(model, batch, 0.1, 0)
    with pytest.raises(ValueError, match="empty"):
        model_divergence(model, [], 0.1, 2)
    with pytest.raises(ValueError, match="'fc.weight'"):
        model_divergence(model, batch, 0.1, 2, params=["fc.weight"])
    with pytest.raises(ValueError, match="'cube'"):
        model_divergence(model, batch, 0.1, 2, distribution="cube")
    with pytest.raises(ValueError, match="shape"):
        model_divergence(model, batch, 0.1, 2, noise=lambda p, g: {n: torch.zeros(1) for n in p})
