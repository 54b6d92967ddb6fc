"""timm models (ResNet, ViT, ConvNeXt) under every method.

Checked for each architecture: SAM's and NRS's gradients against float64 ``torch.func``
references of their written objectives on the timm model itself; for every registered method,
the weights bitwise unchanged by the call, the BatchNorm statistics updated exactly as one plain
training forward updates them, and timm's own norm classes (``BatchNormAct2d``, ``LayerNorm2d``)
recognized, so that ``params="no_norm"`` leaves every norm parameter out.

timm needs torchvision, whose PyPI build does not load beside PyTorch's CPU build; ``.ci/run``
runs this file in a second environment with torch and torchvision from PyPI (see README).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

import flatminima as fm
from flatminima._nn import is_norm_layer
from flatminima._params import select_params

timm = pytest.importorskip("timm")

ARCHS = {
    "resnet": ("resnet10t", {}),
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}),
    "convnext": ("convnext_atto", {"depths": (1, 1, 1, 1)}),
}
# timm's RmsNorm subclasses no PyTorch norm: a ViT built with it checks the name rule.
NORMS = {**ARCHS, "vit-rmsnorm": ("vit_tiny_patch16_224",
                                  {**ARCHS["vit"][1], "norm_layer": "rmsnorm"})}


def make(arch: str) -> nn.Module:
    name, kwargs = NORMS[arch]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3, **kwargs).double()


def batch(n: int = 4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def loss_of(model: nn.Module, x, y):
    """The training-mode loss as a function of the parameters; buffers of a throwaway copy."""
    frozen = copy.deepcopy(model)
    buffers = dict(frozen.named_buffers())

    def loss(params):  # fresh buffers each call: BatchNorm updates them in place
        fresh = {n: b.clone() for n, b in buffers.items()}
        return F.cross_entropy(functional_call(frozen, {**params, **fresh}, (x,)), y)

    return loss


def trainable(model):
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_sam_and_nrs_match_references_on_timm_models(arch):
    x, y = batch()
    model = make(arch)
    loss = loss_of(model, x, y)
    w = trainable(model)
    fm.SAM(rho=0.05).backward(model, x, y)
    g = grad(loss)(w)
    norm = torch.sqrt(sum((t ** 2).sum() for t in g.values()))
    want = grad(loss)({n: w[n] + 0.05 * g[n] / norm for n in w})
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-7, atol=1e-10)

    model = make(arch)
    gen = torch.Generator().manual_seed(2)
    u = {n: 0.01 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in w.items()}
    fm.NRS(alpha=0.5, noise=lambda params, generator: u).backward(model, x, y)

    def nrs_objective(params):
        frozen = copy.deepcopy(model)
        buffers = dict(frozen.named_buffers())
        fresh = {n: b.clone() for n, b in buffers.items()}
        clean = functional_call(frozen, {**params, **fresh}, (x,))
        fresh = {n: b.clone() for n, b in buffers.items()}
        moved = functional_call(frozen, {**{n: params[n] + u[n] for n in params}, **fresh},
                                (x,))
        kl = F.kl_div(F.log_softmax(moved, 1), F.log_softmax(clean, 1), log_target=True,
                      reduction="batchmean")
        return F.cross_entropy(clean, y) + 0.5 * kl + F.cross_entropy(moved, y)

    want = grad(nrs_objective)(w)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_method_keeps_weights_and_updates_statistics_once(arch):
    x, y = batch()
    plain = make(arch)
    once = copy.deepcopy(plain)
    once.train()
    with torch.no_grad():
        once(x)
    for name in fm.list_methods():
        model = copy.deepcopy(plain)
        method = fm.create_method(name)
        if "optimizer" in method.declared:
            method.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        method.backward(model, x, y, generator=torch.Generator().manual_seed(0))
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), (name, n)
            assert p.grad is not None and torch.isfinite(p.grad).all(), (name, n)
        for (n, b), ref in zip(model.named_buffers(), once.buffers(), strict=True):
            torch.testing.assert_close(b, ref, msg=f"{name}: buffer {n}")


@pytest.mark.parametrize("arch", list(NORMS))
def test_timm_norm_layers_are_recognized(arch):
    model = make(arch)
    norms = [m for m in model.modules() if type(m).__module__.startswith(
        ("timm.layers.norm", "torch.nn.modules.batchnorm", "torch.nn.modules.normalization"))]
    assert norms and all(is_norm_layer(m) for m in norms), [type(m).__name__ for m in norms]
    heads = [m for m in model.modules() if type(m).__name__ == "NormMlpClassifierHead"]
    assert not any(is_norm_layer(m) for m in heads)
    kept = select_params(model, "no_norm")
    norm_params = {id(p) for m in norms for p in m.parameters(recurse=False)}
    assert not any(id(p) in norm_params for p in kept.values())
