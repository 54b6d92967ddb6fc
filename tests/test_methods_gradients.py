"""Each method's accumulated gradient equals an independent reference of its written objective."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import flatminima as fm
from tests._method_refs import (
    NOISY,
    TEST_HPARAMS,
    ReplayNoise,
    add,
    fixed_noise,
    params_of,
    ref_grad,
    tiny_batch,
    tiny_mlp,
)

ALL = fm.list_methods()  # the registry: a method without a reference test fails here


def build(name: str, draws=None, **extra):
    hp = dict(TEST_HPARAMS[name], **extra)
    if name in NOISY:
        hp["noise"] = ReplayNoise(draws)
    return fm.create_method(name, **hp)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ALL)
def test_gradient_matches_reference(name):
    model = tiny_mlp()
    x, y = tiny_batch()
    draws = [fixed_noise(params_of(model), seed=10 + i) for i in range(3)]
    method = build(name, draws)
    result = method.backward(model, x, y)
    got = grads_of(model)
    want = ref_grad(name, TEST_HPARAMS[name], model, x, y, draws)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
    clean = F.cross_entropy(model(x), y)
    torch.testing.assert_close(result.loss, clean.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_gradient_accumulates_onto_existing_grad(name):
    model = tiny_mlp()
    x, y = tiny_batch()
    draws = [fixed_noise(params_of(model), seed=10 + i) for i in range(3)]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    build(name, draws).backward(model, x, y)
    want = ref_grad(name, TEST_HPARAMS[name], model, x, y, draws)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n] + 1, rtol=1e-10, atol=1e-12)


def test_nrs_gradient_matches_central_differences():
    """Brute force: central differences of the written NRS objective, every coordinate."""
    model = tiny_mlp(seed=3)
    x, y = tiny_batch(seed=4)
    u = fixed_noise(params_of(model), seed=5, scale=0.2)
    alpha = 1.3
    method = fm.NRS(rho=0.1, alpha=alpha, noise=ReplayNoise([u]))
    method.backward(model, x, y)
    got = grads_of(model)
    w = params_of(model)

    def objective(p):
        z1 = functional_call(model, p, (x,))
        z2 = functional_call(model, add(p, u), (x,))
        p1, p2 = z1.softmax(-1), z2.softmax(-1)
        kl = (p1 * (p1.log() - p2.log())).sum(-1).mean()
        return float(F.cross_entropy(z1, y) + alpha * kl + F.cross_entropy(z2, y))

    h = 1e-6
    for n, t in w.items():
        for i in range(t.numel()):
            plus = {k: v.clone() for k, v in w.items()}
            minus = {k: v.clone() for k, v in w.items()}
            plus[n].view(-1)[i] += h
            minus[n].view(-1)[i] -= h
            fd = (objective(plus) - objective(minus)) / (2 * h)
            assert abs(fd - float(got[n].view(-1)[i])) < 1e-7, (n, i)


def test_nrs_low_memory_equals_default():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(8, 3),
    ).double()
    twin = copy.deepcopy(model)
    x, y = tiny_batch(n=12)
    u = fixed_noise(params_of(model), seed=2)
    torch.manual_seed(7)
    r1 = fm.NRS(alpha=0.9, noise=ReplayNoise([u])).backward(model, x, y)
    torch.manual_seed(7)
    r2 = fm.NRS(alpha=0.9, noise=ReplayNoise([u]), low_memory=True).backward(twin, x, y)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(r1.divergence, r2.divergence)
    for b1, b2 in zip(model.buffers(), twin.buffers(), strict=True):
        assert torch.equal(b1, b2)


def test_sam_rho_zero_is_baseline_and_scheduled_hparams_take_effect():
    model = tiny_mlp()
    x, y = tiny_batch()
    sam = fm.SAM(rho=0.3)
    sam.rho = 0.0  # a schedule may change it between steps
    sam.backward(model, x, y)
    g_sam = grads_of(model)
    model.zero_grad()
    fm.Baseline().backward(model, x, y)
    for n, g in grads_of(model).items():
        torch.testing.assert_close(g_sam[n], g)
    sam.rho = -1.0
    with pytest.raises(ValueError, match="rho"):
        sam.backward(model, x, y)


def test_nrs_divergence_is_zero_at_rho_zero_even_with_dropout():
    """Same dropout masks in both passes: at u = 0 the two outputs agree exactly."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 3))
    x, y = tiny_batch(dtype=torch.float32)
    result = fm.NRS(rho=0.0).backward(model, x, y)
    assert float(result.divergence) == 0.0
    assert torch.allclose(result.loss, result.perturbed_loss)
