"""ReLU and max-pooling without zero tensors: the exact Hessian, the same values, in place kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima.hessian as fh
import flatminima.hessian._piecewise as pw
from flatminima.hessian._piecewise import lean_piecewise_linear
from tests.test_hessian import dense_hessian, gen
from tests.test_hessian_caches import products
from tests.test_hessian_data_conv import node_counts, node_names


class PiecewiseNet(nn.Module):
    """Every ReLU and max-pool spelling the mode handles, plus an in-place ReLU whose caller
    relies on the mutation and a 3D max-pool it leaves alone."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu, self.relu_inplace = nn.ReLU(), nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        h = self.relu(self.conv(x))                     # nn.ReLU -> F.relu
        h = self.pool(h)                                 # nn.MaxPool2d -> F.max_pool2d
        h = self.conv2(h)
        torch.relu_(h)                                   # relies on the in-place change
        h = self.relu_inplace(h * 1.5 - 0.1)
        h = F.max_pool2d(h, (2, 1), stride=(1, 2))
        h = torch.relu(h - 0.05).relu()                  # torch.relu, Tensor.relu
        h = F.relu(h + F.max_pool1d(h.flatten(2), 1).view_as(h) * 0.1)
        h = torch.max_pool2d(h, 2, 1)
        return self.head(torch.cat([h, h], 3).flatten(1))


@pytest.fixture(autouse=True)
def every_size(monkeypatch):
    """The test activations are small: take the new path for all of them."""
    monkeypatch.setattr(pw, "MIN_NUMEL", 0)


def setup(seed: int = 0):
    torch.manual_seed(seed)
    model = PiecewiseNet().double()
    g = gen(seed + 1)
    x = torch.randn(10, 2, 8, 8, dtype=torch.float64, generator=g)
    model(x)  # materialize the lazy head
    return model, x, torch.randint(0, 3, (10,), generator=g)


def test_same_values_and_the_new_path_under_the_mode():
    model, x, _ = setup()
    with torch.no_grad():
        ref = model(x)
    w = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    with lean_piecewise_linear():
        out = torch.func.functional_call(model, w, (x,))
        with torch.no_grad():
            untouched = torch.func.functional_call(model, w, (x,))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(untouched, ref, rtol=0, atol=0)
    counts = node_counts(out.grad_fn)
    assert counts.get("_ReluBackward") == 6 and "ReluBackward0" not in counts
    assert counts.get("_MaxPool2dBackward") == 3
    # The 1D max-pool is not handled: PyTorch's own node.
    assert counts.get("MaxPool2DWithIndicesBackward0") == 1
    assert "_ReluBackward" not in node_names(model(x).grad_fn)



@pytest.mark.parametrize("lean", [True, False])
def test_products_equal_dense_hessian(lean):
    model, x, y = setup(3)
    h = dense_hessian(model, x, y)
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), lean_piecewise=lean)
    assert op.lean_piecewise is lean
    vs = torch.randn(3, h.shape[0], dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)


def test_subset_after_the_pieces_and_before_them():
    model, x, y = setup(5)
    # (A flat vector over a selection follows model.named_parameters() order.)
    for names in (["conv2.bias", "head.weight"], ["conv.weight"]):
        h = dense_hessian(model, x, y, names)
        op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), names)
        vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
        torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("curvature,mode", [("hessian", "forward_over_reverse"), ("ggn", "auto")])
def test_off_for_products_through_torch_func(curvature, mode):
    model, x, y = setup()
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), curvature=curvature, mode=mode)
    assert op.lean_piecewise is False


def test_small_activations_keep_pytorchs_path(monkeypatch):
    model, x, _ = setup()
    monkeypatch.setattr(pw, "MIN_NUMEL", 10 * 4 * 8 * 8 + 1)   # just above the largest one
    w = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    with lean_piecewise_linear():
        counts = node_counts(torch.func.functional_call(model, w, (x,)).grad_fn)
    assert "_ReluBackward" not in counts and "_MaxPool2dBackward" not in counts
    monkeypatch.setattr(pw, "MIN_NUMEL", 10 * 4 * 8 * 8)       # the first ReLU's size
    with lean_piecewise_linear():
        counts = node_counts(torch.func.functional_call(model, w, (x,)).grad_fn)
    assert counts.get("_ReluBackward") == 1 and counts.get("_MaxPool2dBackward") == 1
