"""The measurements on the shared helpers (flatminima._nn, _checks, _kl): the same draws, values
and errors as the code they replace.

The expected values are computed here with the formulas the measurements used before (the inline
Gaussian draw of ``landscape.random_direction`` and ``volume._unit_directions``), so stored
results that depend on a seed stay reproducible.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima._kl as kl_mod
import flatminima._nn as fnn
import flatminima.divergence as fd
import flatminima.hessian as fh
import flatminima.hessian._operator as fop
import flatminima.landscape as fl
import flatminima.volume as fv
from flatminima._params import measuring_mode


def old_gaussian(params, generator):
    """The inline draw of landscape.random_direction / volume._unit_directions before the move."""
    device = generator.device if generator is not None else None
    return {
        n: torch.randn(p.shape, generator=generator, device=device or p.device,
                       dtype=p.dtype).to(p.device)
        for n, p in params.items()
    }


def old_unit_directions(selected, m, kind, generator):
    """volume._unit_directions before the move."""
    out = []
    for _ in range(m):
        raw = old_gaussian(selected, generator)
        if kind == "filter":
            d = fl.normalize_direction(raw, selected, norm="filter", bias_bn="filter")
        else:
            norm = torch.sqrt(sum((t.double() ** 2).sum() for t in raw.values()))
            d = {n: t / norm.to(t.dtype) for n, t in raw.items()}
        out.append(d)
    return out


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6, 3)).double().eval()


def data(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 2, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for n in a:
        assert a[n].dtype == b[n].dtype and a[n].device == b[n].device
        assert torch.equal(a[n], b[n]), n


# -- the Gaussian draw -----------------------------------------------------------------------

def test_gaussian_like_draws_what_the_inline_code_drew():
    params = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64),
              "c": torch.zeros(2, 1, 3, dtype=torch.float16), "d": torch.zeros(())}
    for seed in (0, 1, 12345):
        got = fnn.gaussian_like(params, torch.Generator().manual_seed(seed))
        want = old_gaussian(params, torch.Generator().manual_seed(seed))
        assert_same(got, want)
    # No generator: the global stream, consumed the same way.
    torch.manual_seed(7)
    got = fnn.gaussian_like(params)
    torch.manual_seed(7)
    assert_same(got, old_gaussian(params, None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gaussian_like_cpu_generator_on_cuda_parameters():
    params = {"w": torch.zeros(64, 3, device="cuda"), "b": torch.zeros(64, device="cuda")}
    got = fnn.gaussian_like(params, torch.Generator().manual_seed(0))
    want = old_gaussian(params, torch.Generator().manual_seed(0))
    assert_same(got, want)
    cpu = fnn.gaussian_like({n: p.cpu() for n, p in params.items()},
                            torch.Generator().manual_seed(0))
    for n in params:   # a seed gives the same draw on every device
        assert torch.equal(got[n].cpu(), cpu[n])


@pytest.mark.parametrize("norm, bias_bn", [("filter", "zero"), ("filter", "filter"),
                                           ("layer", "weight"), ("global", "zero"),
                                           ("none", "zero")])
def test_random_direction_is_bitwise_the_previous_one(norm, bias_bn):
    model = net()
    params = {n: p for n, p in model.named_parameters()}
    got = fl.random_direction(model, norm=norm, bias_bn=bias_bn,
                              generator=torch.Generator().manual_seed(3))
    raw = old_gaussian(params, torch.Generator().manual_seed(3))
    want = fl.normalize_direction(raw, {n: p.detach() for n, p in params.items()}, norm=norm,
                                  bias_bn=bias_bn)
    assert_same(got, want)


def test_random_direction_draws_one_after_another_from_one_generator():
    model = net()
    params = {n: p for n, p in model.named_parameters()}
    g_new, g_old = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for _ in range(3):
        got = fl.random_direction(model, norm="none", generator=g_new)
        assert_same(got, old_gaussian(params, g_old))


@pytest.mark.parametrize("kind", ["sphere", "filter"])
def test_volume_directions_are_bitwise_the_previous_ones(kind):
    model = net()
    selected = {n: p.detach() for n, p in model.named_parameters()}
    got = fv._unit_directions(selected, 4, kind, torch.Generator().manual_seed(5))
    want = old_unit_directions(selected, 4, kind, torch.Generator().manual_seed(5))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        assert_same(a, b)


def test_basin_radius_is_bitwise_the_previous_one(monkeypatch):
    model, batch = net(), data()
    kw = dict(num_directions=3, rtol=1e-2, chunk_size=1)
    got = fv.basin_radius(model, F.cross_entropy, batch, generator=torch.Generator().manual_seed(2),
                          **kw)
    monkeypatch.setattr(fv, "_unit_directions", old_unit_directions)
    want = fv.basin_radius(model, F.cross_entropy, batch,
                           generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(got.radii, want.radii)
    assert torch.equal(got.censored, want.censored)
    assert got.center_loss == want.center_loss and got.cutoff == want.cutoff


# -- one home for each helper ----------------------------------------------------------------

def test_each_helper_has_one_home():
    assert fop.LossFn is fnn.LossFn and fl.LossFn is fnn.LossFn and fv.LossFn is fnn.LossFn
    assert fd.kl_divergence is kl_mod.kl_divergence
    assert not hasattr(fl, "_filter_rows")
    w = torch.arange(24.0).reshape(4, 2, 3)
    assert torch.equal(fnn.filter_rows(w), w.reshape(4, 6))
    assert torch.equal(fnn.filter_rows(torch.arange(3.0)), torch.arange(3.0).reshape(3, 1))


def test_kl_divergence_stays_public_and_exact():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    ref = (p.softmax(-1) * (p.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(fd.kl_divergence(p, q), ref)
    from flatminima.divergence import kl_divergence
    assert kl_divergence is kl_mod.kl_divergence


# -- train-mode normalization layers in the curvature operator -------------------------------

def instance_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.InstanceNorm2d(3, affine=True,
                                                               track_running_stats=True),
                         nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double().train()


def test_train_mode_instance_norm_with_tracked_stats_works_in_every_product_mode():
    """``tracking_norm_layers`` also selects InstanceNorm (a ``_NormBase``): its forward updates
    the running statistics whatever ``track_running_stats`` says, so the products are the same
    as before, the flag comes back, and the measurement restores the buffers."""
    model = instance_norm_net()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64),
             torch.randint(0, 4, (6,), generator=g))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    with measuring_mode(model, train=True):
        op = fh.CurvatureOperator(model, F.cross_entropy, batch)
        assert op._train_norms == [model[1]]
        dense = torch.stack([op.matvec(e) for e in torch.eye(op.size, dtype=torch.float64)])
    assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    torch.testing.assert_close(dense, dense.T, rtol=1e-8, atol=1e-10)
    top = torch.linalg.eigvalsh(dense).flip(0)[:3]
    for mode in ("double_backward", "forward_over_reverse"):
        got = fh.eigenvalues(model, F.cross_entropy, batch, k=3, train=True, mode=mode, tol=1e-9,
                             generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, top, rtol=1e-7, atol=0)
        assert model[1].track_running_stats is True
        assert all(torch.equal(state[n], t) for n, t in model.state_dict().items())
    t = fh.trace(model, F.cross_entropy, batch, num_matvecs=8, method="hutchinson", block=4,
                 train=True, mode="forward_over_reverse",
                 generator=torch.Generator().manual_seed(0))
    assert math.isfinite(float(t))


def test_train_mode_batchnorm_updates_no_statistic_inside_the_operator():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5, momentum=None), nn.ReLU(),
                          nn.Linear(5, 2)).double().train()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.tensor([0, 1] * 4)
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y))
    before = {n: b.clone() for n, b in model.named_buffers()}
    op.matvec(torch.ones(op.size, dtype=torch.float64))
    op.gradient()
    assert all(torch.equal(before[n], b) for n, b in model.named_buffers())
    assert model[1].track_running_stats is True


# -- the shared checks keep the messages the tests match -------------------------------------

def test_checks_refuse_bools_and_name_the_argument():
    model, batch = net(), data()
    for bad in (0, True, 1.0):
        with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
            fd.model_divergence(model, batch, 0.1, bad)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        fl.line(model, None, batch, fl.random_direction(model), [0.0], chunk_size=True)
    with pytest.raises(ValueError, match="noise must be callable"):
        fd.model_divergence(model, batch, 0.1, 2, noise=3)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        fh.eigenvalues(model, "cross_entropy", batch)
    with pytest.raises(ValueError, match="unknown hvp mode 'fast'; choose one of auto, "):
        fh.eigenvalues(model, None, batch, mode="fast")
    with pytest.raises(ValueError, match="max_basis must be an integer >= 0"):
        fh.trace(model, None, batch, max_basis=-1)
    with pytest.raises(ValueError, match="grid_size must be an integer >= 2"):
        fh.density(model, None, batch, num_steps=2, grid_size=1)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        fv.log_volume_from_radii(torch.ones(3), True)
    with pytest.raises(ValueError, match="unknown directions 'cube'; choose one of sphere, "):
        fv.basin_radius(model, None, batch, directions="cube")


def test_norm_layers_of_other_libraries_are_known_by_name_and_heads_are_not():
    from flatminima._nn import is_norm_layer

    class LlamaRMSNorm(nn.Module):  # Hugging Face's kind: a leaf, no PyTorch base
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    class RmsNorm2dFp32(LlamaRMSNorm):
        pass

    class NormMlpClassifierHead(nn.Module):  # contains a norm, is not one
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 2)

    class Normalize(nn.Module):
        pass

    assert is_norm_layer(LlamaRMSNorm()) and is_norm_layer(RmsNorm2dFp32())
    assert is_norm_layer(nn.BatchNorm2d(3)) and is_norm_layer(nn.LayerNorm(3))
    assert not is_norm_layer(NormMlpClassifierHead()) and not is_norm_layer(Normalize())
