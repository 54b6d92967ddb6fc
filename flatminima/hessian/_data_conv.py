"""Convolutions of a constant input (the data) with a double-backward that skips its gradient.

A Hessian-vector product by double-backward differentiates the backward pass of every layer.
For a convolution ``o = conv(x; W, b)`` the backward computes ``g_W = conv_wgrad(x, g_o)`` (and
``g_x`` when ``x`` needs one), and its derivative in a weight direction ``V`` is

    d g_o  <-  conv(x; V, c)                      (what the product needs)
    d g_x  <-  conv_transpose(g_o; V)             (the input's gradient, second order)

PyTorch's convolution double-backward computes the second term whenever ``V`` is given, even
when ``x`` is the data and nobody asks for its gradient. On the first layer of a CNN that term
is a transposed convolution over the largest activation, so skipping it makes every product
cheaper (measured on the MNIST CNN of ``benchmarks/hessian.py`` in
``benchmarks/results/hessian.md``, section 1).

:class:`_DataConv` is the same convolution with a backward of its own: ``x`` gets no gradient,
and ``g_W, g_b`` come from :class:`_WeightGrad`, a linear map of ``g_o`` whose derivative is the
forward convolution ``conv(x; V, c)`` alone. Values and all first and second derivatives are
the same function's (up to rounding; the tests compare with PyTorch's own convolution and a
dense Hessian). :func:`data_convolutions` installs it, for the duration of a block, on the
convolution modules of a model; a call whose input requires a gradient, whose weight does not,
or whose padding is not a plain zero padding falls back to the module's own convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_Geometry = tuple[list[int], list[int], list[int], int]     # stride, padding, dilation, groups


def _convolve(x: Tensor, weight: Tensor, bias: Tensor | None, geometry: _Geometry) -> Tensor:
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                      [0] * len(stride), groups)


class _WeightGrad(torch.autograd.Function):
    """``g_o -> (g_W, g_b)`` of ``conv(x; W, b)`` for a fixed ``x``; linear in ``g_o``, whose
    adjoint ``(V, c) -> conv(x; V, c)`` is the backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out: Tensor, x: Tensor, weight: Tensor, has_bias: bool,
                geometry: _Geometry) -> tuple[Tensor, Tensor | None]:
        stride, padding, dilation, groups = geometry
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0] * len(stride), groups, [False, True, has_bias])
        return grad_w, grad_b

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, x, _, _, geometry = inputs
        ctx.save_for_backward(x)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_grad_w: Tensor, grad_grad_b: Tensor | None):
        (x,) = ctx.saved_tensors
        return _convolve(x, grad_grad_w, grad_grad_b, ctx.geometry), None, None, None, None


class _DataConv(torch.autograd.Function):
    """``conv(x; W, b)`` with no gradient for ``x`` and a cheap double-backward (see above)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, geometry: _Geometry) -> Tensor:
        return _convolve(x, weight, bias, geometry)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias, geometry = inputs
        ctx.save_for_backward(x, weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        grad_w, grad_b = _WeightGrad.apply(grad_out, x, weight, ctx.bias_grad, ctx.geometry)
        return None, grad_w, grad_b, None


def _geometry(conv: nn.Module) -> _Geometry | None:
    """Stride, explicit zero padding, dilation and groups of ``conv``; ``None`` where the module
    pads otherwise (a padding mode, or ``"same"`` with an uneven total padding)."""
    if conv.padding_mode != "zeros":
        return None
    dims = len(conv.kernel_size)
    padding = conv.padding
    if padding == "valid":
        padding = (0,) * dims
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            return None
        padding = tuple(t // 2 for t in total)
    return list(conv.stride), list(padding), list(conv.dilation), conv.groups


def _data_conv_forward(conv: nn.Module, geometry: _Geometry):
    own = type(conv)._conv_forward

    def conv_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if torch.is_grad_enabled() and weight.requires_grad and not x.requires_grad:
            return _DataConv.apply(x, weight, bias, geometry)
        return own(conv, x, weight, bias)

    return conv_forward


@contextlib.contextmanager
def data_convolutions(model: nn.Module) -> Iterator[None]:
    """Within the block, the convolution modules of ``model`` convolve a constant input through
    :class:`_DataConv`. The modules' ``_conv_forward`` is replaced, so folded BatchNorm layers
    (:mod:`flatminima.hessian._eval_norm`), which call it, get the same treatment."""
    patched = []
    for m in model.modules():
        if isinstance(m, CONVOLUTIONS) and "_conv_forward" not in m.__dict__:
            geometry = _geometry(m)
            if geometry is not None:
                # An instance attribute: called as self._conv_forward(x, weight, bias).
                m._conv_forward = _data_conv_forward(m, geometry)
                patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("_conv_forward", None)
