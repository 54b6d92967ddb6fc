"""The data-convolution double-backward gives the exact Hessian, only where it is meant to act."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima.hessian as fh
from flatminima.hessian._data_conv import data_convolutions
from tests.test_hessian import dense_hessian, gen
from tests.test_hessian_caches import products


class ConvNet(nn.Module):
    """``conv`` reads the data; ``conv2`` reads an activation (its input needs a gradient)."""

    def __init__(self, conv: nn.Module, dims: int):
        super().__init__()
        self.conv = conv
        conv2 = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        self.conv2 = conv2(conv.out_channels, 2, 1)
        self.head = nn.LazyLinear(3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv2(torch.tanh(self.conv(x)))).flatten(1))


CONVS = {
    "2d plain": (lambda: nn.Conv2d(2, 4, 3, padding=1), 2),
    "2d strided, dilated, grouped": (lambda: nn.Conv2d(2, 4, 3, stride=2, dilation=2,
                                                       padding=2, groups=2), 2),
    "2d no bias, same": (lambda: nn.Conv2d(2, 3, 3, padding="same", bias=False), 2),
    "2d valid": (lambda: nn.Conv2d(2, 3, (2, 3), padding="valid"), 2),
    "2d wide, strided, dilated, no bias": (lambda: nn.Conv2d(2, 18, 3, stride=2, dilation=2,
                                                             padding=1, bias=False), 2),
    "1d": (lambda: nn.Conv1d(2, 3, 3, padding=1), 1),
    "3d": (lambda: nn.Conv3d(2, 2, 2), 3),
    "reflect padding (falls back)": (lambda: nn.Conv2d(2, 3, 3, padding=1,
                                                       padding_mode="reflect"), 2),
    "same, even kernel (falls back)": (lambda: nn.Conv2d(2, 3, 2, padding="same"), 2),
}


def setup(name: str, seed: int = 0):
    torch.manual_seed(seed)
    make, dims = CONVS[name]
    model = ConvNet(make(), dims).double()
    shape = {1: (9,), 2: (6, 6), 3: (4, 4, 4)}[dims]
    g = gen(seed + 1)
    x = torch.randn(10, 2, *shape, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    model(x)  # materialize the lazy head
    return model, x, y


def node_counts(root) -> dict[str, int]:
    """How many autograd nodes of each type the graph below ``root`` holds."""
    seen, stack, counts = set(), [root], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        counts[type(node).__name__] = counts.get(type(node).__name__, 0) + 1
        stack.extend(nxt for nxt, _ in node.next_functions)
    return counts


def node_names(root) -> set[str]:
    return set(node_counts(root))


@pytest.mark.parametrize("name", list(CONVS))
def test_products_equal_dense_hessian_with_and_without(name):
    model, x, y = setup(name)
    h = dense_hessian(model, x, y)
    vs = torch.randn(3, h.shape[0], dtype=torch.float64, generator=gen(3))
    for data_convs in (True, False):
        op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), data_convs=data_convs)
        assert op.data_convs is data_convs
        torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)
    assert all("_conv_forward" not in m.__dict__ for m in model.modules())  # restored


# conv2.weight alone: conv2's input comes from frozen layers, so it takes the new path too.
@pytest.mark.parametrize("params", [["conv.weight"], ["conv2.weight"],
                                    ["conv.weight", "conv2.weight"], ["conv.bias", "head.weight"]])
def test_parameter_subsets_including_a_frozen_bias(params):
    model, x, y = setup("2d strided, dilated, grouped", seed=4)
    h = dense_hessian(model, x, y, params)
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), params)
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)


def test_only_the_convolution_of_the_data_takes_the_new_path():
    model, x, y = setup("2d plain")
    w = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
    with data_convolutions(model):
        loss = F.cross_entropy(torch.func.functional_call(model, w, (x,)), y)
        names = node_names(loss.grad_fn)
        (g,) = torch.autograd.grad(loss, [w["conv.weight"]], create_graph=True)
        with torch.no_grad():  # no gradient wanted: the module's own convolution
            plain = torch.func.functional_call(model, w, (x,))
    assert sum(n == "_DataConvBackward" for n in names) == 1
    assert "ConvolutionBackward0" in names          # conv2, whose input needs a gradient
    assert "_WeightGradBackward" in node_names(g.grad_fn)
    assert plain.grad_fn is None
    torch.testing.assert_close(plain, model(x), rtol=1e-12, atol=0)
    # Without the block the model is untouched.
    assert "_DataConvBackward" not in node_names(F.cross_entropy(model(x), y).grad_fn)


@pytest.mark.parametrize("curvature,mode", [("hessian", "forward_over_reverse"), ("ggn", "auto")])
def test_off_for_products_through_torch_func(curvature, mode):
    model, x, y = setup("2d plain")
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), curvature=curvature, mode=mode)
    assert op.data_convs is False


@pytest.mark.parametrize("lean_piecewise", [True, False])
@pytest.mark.parametrize("norm", [True, False])
def test_in_place_relu_after_the_data_convolution(lean_piecewise, norm):
    """A ResNet stem: conv, BatchNorm (folded into it), ReLU(inplace=True)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 18, 3, padding=1, bias=not norm),
                          nn.BatchNorm2d(18) if norm else nn.Identity(), nn.ReLU(inplace=True),
                          nn.Conv2d(18, 3, 3, stride=2), nn.Flatten(), nn.LazyLinear(3)).double()
    g = gen(7)
    x = torch.randn(10, 2, 6, 6, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (10,), generator=g)
    model(x)
    if norm:
        model[1].running_mean.uniform_(-0.3, 0.3)
        model[1].running_var.uniform_(0.5, 1.5)
    model.eval()
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), lean_piecewise=lean_piecewise)
    assert len(op.folds) == int(norm)
    h = dense_hessian(model, x, y)
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)
