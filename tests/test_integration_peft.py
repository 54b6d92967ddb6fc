"""PEFT LoRA: adapters-only perturbations and Flat-LoRA's merged-weight noise, against float64
references written with torch.func on the LoRA forward (x W^T + s x A^T B^T), not on PEFT."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import flatminima as fm

peft = pytest.importorskip("peft")

from flatminima.integrations.peft import (  # noqa: E402
    FlatLoRA,
    adapter_params,
    filter_gaussian,
    merged_weights,
)

LAYERS = ("base_model.model.0", "base_model.model.2")


def tiny_lora(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():  # B starts at zero in LoRA; a trained-like B makes W' differ from W
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def batch(n: int = 12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 3, (n,), generator=g)


def lora_loss(model: nn.Module, x, y):
    """The loss as a pure function of (frozen weights, adapters), the LoRA forward written out."""
    w = {n: p.detach() for n, p in model.named_parameters()}
    s = 2.0  # lora_alpha / r

    def layer(h, i, frozen, adapters):
        pre = f"base_model.model.{i}"
        out = h @ frozen[f"{pre}.base_layer.weight"].T + w[f"{pre}.base_layer.bias"]
        a, b = adapters[f"{pre}.lora_A.default.weight"], adapters[f"{pre}.lora_B.default.weight"]
        return out + s * (h @ a.T) @ b.T

    def loss(adapters, frozen):
        return F.cross_entropy(layer(torch.tanh(layer(x, 0, frozen, adapters)), 2, frozen,
                                     adapters), y)

    return loss


def adapters_of(model):
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def test_adapter_params_are_the_lora_tensors_only():
    model = tiny_lora()
    names = adapter_params(model)
    assert sorted(names) == sorted(adapters_of(model))
    with pytest.raises(ValueError, match="no trainable PEFT adapter"):
        adapter_params(nn.Linear(2, 2))


def test_sam_on_the_adapters_matches_the_written_objective():
    model = tiny_lora()
    x, y = batch()
    fm.SAM(rho=0.1, params=adapter_params(model)).backward(model, x, y)
    frozen = {n: p.detach() for n, p in model.named_parameters()}
    loss = lora_loss(model, x, y)
    a = adapters_of(model)
    g = grad(loss)(a, frozen)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    want = grad(loss)({n: a[n] + 0.1 * g[n] / norm for n in a}, frozen)
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12)
        else:
            assert p.grad is None  # frozen weights get nothing


def test_merged_weights_include_the_adapters():
    model = tiny_lora()
    merged = merged_weights(model)
    assert sorted(merged) == [f"{n}.base_layer.weight" for n in LAYERS]
    p = dict(model.named_parameters())
    for layer in LAYERS:
        w = p[f"{layer}.base_layer.weight"]
        delta = 2.0 * p[f"{layer}.lora_B.default.weight"] @ p[f"{layer}.lora_A.default.weight"]
        torch.testing.assert_close(merged[f"{layer}.base_layer.weight"], w + delta)
    assert list(merged_weights(model, [LAYERS[1]])) == [f"{LAYERS[1]}.base_layer.weight"]
    with pytest.raises(ValueError, match="no LoRA layer named 'nope'"):
        merged_weights(model, ["nope"])


def test_flat_lora_gradient_is_the_adapters_gradient_at_the_perturbed_merged_weight():
    model = tiny_lora()
    x, y = batch()
    g = torch.Generator().manual_seed(4)
    eps = {f"{n}.base_layer.weight": 0.05 * torch.randn(w.shape, generator=g, dtype=w.dtype)
           for n, w in ((n, model.get_submodule(n).base_layer.weight) for n in LAYERS)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = FlatLoRA(noise=lambda merged, gen: eps).backward(model, x, y)
    frozen = {n: p.detach() for n, p in model.named_parameters()}
    moved = {n: t + eps[n] if n in eps else t for n, t in frozen.items()}
    want = grad(lora_loss(model, x, y))(adapters_of(model), moved)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])  # nothing was moved
        if n in want:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-10, atol=1e-12)
        else:
            assert p.grad is None
    clean = F.cross_entropy(functional_call(model, frozen, (x,)), y)
    assert float(result.loss) == pytest.approx(float(clean), rel=1e-12)


def test_flat_lora_noise_is_scaled_to_each_row_of_the_merged_weight():
    model = tiny_lora()
    merged = merged_weights(model)
    draw = filter_gaussian(0.1)
    g = torch.Generator().manual_seed(0)
    samples = [draw(merged, g) for _ in range(3000)]
    for name, w in merged.items():
        stack = torch.stack([s[name] for s in samples])  # (samples, out, in)
        std = stack.reshape(len(samples), w.shape[0], -1).std(dim=(0, 2))
        want = 0.1 * w.norm(dim=1) / math.sqrt(w.shape[1])
        torch.testing.assert_close(std, want, rtol=0.06, atol=0)


def test_flat_lora_trains_the_adapters_and_refuses_params():
    model = tiny_lora()
    x, y = batch(48)
    method = FlatLoRA(sigma=0.05)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        start = float(F.cross_entropy(model(x), y))
    for _ in range(40):
        method.backward(model, x, y, generator=gen)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < start
    with pytest.raises(ValueError, match="takes layers=, not params="):
        FlatLoRA(params=["x"])
    with pytest.raises(ValueError, match="no LoRA layer"):
        FlatLoRA().backward(nn.Linear(4, 3).double(), x, y)


def test_flat_lora_layers_must_be_names_or_a_predicate():
    with pytest.raises(ValueError, match="layers must be None, a list of LoRA module names"):
        FlatLoRA(layers="base_model.model.0")
    FlatLoRA(layers=("a", "b"))  # a tuple of names is accepted
