"""Convolutions of a constant input (the data) with a double-backward that skips its gradient.

A Hessian-vector product by double-backward differentiates the backward pass of every layer.
For a convolution ``o = conv(x; W, b)`` the backward computes ``g_W = conv_wgrad(x, g_o)`` (and
``g_x`` when ``x`` needs one), and its derivative in a weight direction ``V`` is

    d g_o  <-  conv(x; V, c)                      (what the product needs)
    d g_x  <-  conv_transpose(g_o; V)             (the input's gradient, second order)

PyTorch's convolution double-backward computes the second term whenever ``V`` is given, even
when ``x`` is the data and nobody asks for its gradient. On the first layer of a CNN that term
is a transposed convolution over the largest activation and costs about as much as the rest of
the layer's share of the product.

:class:`_DataConv` is the same convolution with a backward of its own: ``x`` gets no gradient,
and ``g_W, g_b`` come from :class:`_WeightGrad`, a linear map of ``g_o`` whose derivative is the
forward convolution ``conv(x; V, c)`` alone. Values and all first and second derivatives are
the same function's (up to rounding; the tests compare with PyTorch's own convolution and a
dense Hessian). Since ``x`` is constant, its patches can be unfolded once: on CPU, for few input
channels (``C_in * k * k <= C_out``, the data's 1 or 3), the forward and ``conv(x; V, c)`` then
run as one matrix product each, several times faster than the convolution kernel there
(:func:`_unfold`). :func:`data_convolutions` installs it, for the duration of a block, on the
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


def _convolve(x: Tensor, cols: Tensor | None, weight: Tensor, bias: Tensor | None,
              geometry: _Geometry, fresh: bool = False) -> Tensor:
    """``conv(x; weight, bias)``, as one matrix product with the unfolded input ``cols`` where
    it is given (see :func:`_unfold`). ``fresh``: the result is not a view (an autograd
    Function's output may then be changed in place, by an in-place ReLU)."""
    stride, padding, dilation, groups = geometry
    if cols is None:
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False,
                                          [0] * len(stride), groups)
    # reshape, not view: autograd's batched backward (is_grads_batched) runs this under a
    # vmap without batching rules for views.
    matrix = weight.reshape(weight.shape[0], -1)
    if cols.shape[1] > matrix.shape[1]:      # a row of ones: the bias enters the product
        shift = torch.zeros_like(matrix[:, :1]) if bias is None else bias.reshape(-1, 1)
        matrix = torch.cat([matrix, shift], 1)
    shape = (x.shape[0], weight.shape[0], *_output_size(x, weight, geometry))
    if fresh:
        out = x.new_empty(shape)
        torch.matmul(matrix, cols, out=out.view(shape[0], shape[1], -1))
        return out
    return torch.matmul(matrix, cols).reshape(shape)                   # (N, C_out, L) -> shape


def _output_size(x: Tensor, weight: Tensor, geometry: _Geometry) -> list[int]:
    stride, padding, dilation, _ = geometry
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
            zip(x.shape[2:], weight.shape[2:], stride, padding, dilation, strict=True)]


def _unfold(x: Tensor, weight: Tensor, bias: Tensor | None, geometry: _Geometry
            ) -> Tensor | None:
    """The input's patches ``(N, C_in * k * k [+ 1], L)`` (a row of ones where there is a
    ``bias``, so that it enters the matrix product instead of a pass over the output) for a 2D
    convolution whose product with the weight matrix beats the convolution kernel, else
    ``None``.

    On CPU a convolution with few input channels (the data: 1 or 3) runs far below the speed of
    a matrix product of the same size (MNIST's first layer, batch 512: 31.6 ms against 5.3 ms
    for the product; CIFAR's 3-channel stem, batch 128: 47 against 29 ms). The patches are
    unfolded once per batch and kept with the graph, so they are taken only where they are no
    larger than the layer's output (``C_in * k * k <= C_out``), which the graph keeps anyway.
    """
    stride, padding, dilation, groups = geometry
    if x.device.type != "cpu" or x.dim() != 4 or groups != 1 \
            or weight[0].numel() > weight.shape[0]:
        return None
    cols = torch.ops.aten.im2col(x, list(weight.shape[2:]), dilation, padding, stride)
    if bias is None:
        return cols
    return torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], 1)


class _WeightGrad(torch.autograd.Function):
    """``g_o -> (g_W, g_b)`` of ``conv(x; W, b)`` for a fixed ``x``; linear in ``g_o``, whose
    adjoint ``(V, c) -> conv(x; V, c)`` is the backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out: Tensor, x: Tensor, cols: Tensor | None, weight: Tensor,
                has_bias: bool, geometry: _Geometry) -> tuple[Tensor, Tensor | None]:
        stride, padding, dilation, groups = geometry
        _, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if has_bias else None, stride, padding,
            dilation, False, [0] * len(stride), groups, [False, True, has_bias])
        return grad_w, grad_b

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _, x, cols, _, _, geometry = inputs
        ctx.save_for_backward(x, cols)
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_grad_w: Tensor, grad_grad_b: Tensor | None):
        x, cols = ctx.saved_tensors
        grad_out = _convolve(x, cols, grad_grad_w, grad_grad_b, ctx.geometry)
        return grad_out, None, None, None, None, None


class _DataConv(torch.autograd.Function):
    """``conv(x; W, b)`` with no gradient for ``x`` and a cheap double-backward (see above)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, cols: Tensor | None, weight: Tensor, bias: Tensor | None,
                geometry: _Geometry) -> Tensor:
        return _convolve(x, cols, weight, bias, geometry, fresh=True)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, cols, weight, bias, geometry = inputs
        ctx.save_for_backward(x, cols, weight)
        ctx.bias_grad = bias is not None and bias.requires_grad
        ctx.geometry = geometry

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, cols, weight = ctx.saved_tensors
        grad_w, grad_b = _WeightGrad.apply(grad_out, x, cols, weight, ctx.bias_grad,
                                           ctx.geometry)
        return None, None, grad_w, grad_b, None


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
            cols = _unfold(x, weight, bias, geometry)
            return _DataConv.apply(x, cols, weight, bias, geometry)
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
