"""ReLU and max-pooling with a double-backward that allocates no zero tensors.

Both are piecewise linear: their backward is linear in the incoming gradient with a mask fixed
by the forward pass (ReLU: ``g_x = g_y * [y > 0]``; 2D max-pooling: ``g_x`` scatters ``g_y`` to
the recorded argmax positions). The second derivative in the input is zero, and PyTorch's
formulas for differentiating these backward passes say so by building a zero tensor of the
activation's size (``zeros_like``) and adding it into the gradient that flows back: two full-size
memory passes per layer and product, for nothing; leaving them out makes a product cheaper on
the MNIST CNN of ``benchmarks/hessian.py`` (measured in ``benchmarks/results/hessian.md``,
section 1).

:class:`_Relu` and :class:`_MaxPool2d` are the same functions with the backward written as an
autograd Function whose own backward (a mask, a gather) is the only second-order term. Values
and derivatives are PyTorch's (the same masks and argmax indices; the tests compare products
with the dense Hessian). :func:`lean_piecewise_linear` routes ``F.relu`` / ``torch.relu`` /
``Tensor.relu`` (and their in-place forms, kept in place) and ``F.max_pool2d`` /
``torch.max_pool2d`` on 4D inputs through them while a block runs (a ``TorchFunctionMode``, so
modules and functional calls alike); any other call, one whose input needs no gradient or one
on fewer than :data:`MIN_NUMEL` elements (where the Python-level Functions cost more than the
zeros) runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode


class _ReluGrad(torch.autograd.Function):
    """``g_y -> g_y * [y > 0]`` for a fixed output ``y``; its own adjoint."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out: Tensor, out: Tensor) -> Tensor:
        return torch.ops.aten.threshold_backward(grad_out, out, 0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad_grad: Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad_grad, out, 0), None


class _Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, inplace: bool) -> Tensor:
        if inplace:
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = x.relu()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (out,) = ctx.saved_tensors
        return _ReluGrad.apply(grad_out, out), None


class _MaxPoolGrad(torch.autograd.Function):
    """``g_y -> g_x``: scatter to the argmax ``indices`` of each window; adjoint: gather."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out: Tensor, x: Tensor, indices: Tensor, geometry: tuple) -> Tensor:
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, *geometry, indices)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad_grad: Tensor):
        (indices,) = ctx.saved_tensors
        # reshape, not flatten/view: autograd's batched backward (is_grads_batched) runs this
        # under a vmap that has no batching rule for those views.
        n, c, h, w = grad_grad.shape
        flat_indices = indices.reshape(n, c, -1)
        pooled = grad_grad.reshape(n, c, h * w).gather(2, flat_indices).reshape(indices.shape)
        return pooled, None, None, None


class _MaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, geometry: tuple) -> Tensor:
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, *geometry)
        ctx.save_for_backward(x, indices)
        ctx.geometry = geometry
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, indices = ctx.saved_tensors
        return _MaxPoolGrad.apply(grad_out, x, indices, ctx.geometry), None


def _pool_geometry(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                   ceil_mode=False, return_indices=False) -> tuple | None:
    """``(kernel, stride, padding, dilation, ceil_mode)`` of a ``max_pool2d`` call this module
    handles, else ``None``."""
    if return_indices or not isinstance(x, Tensor) or x.dim() != 4:
        return None
    kernel = list(_pair(kernel_size))
    stride = kernel if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
        else list(_pair(stride))
    return kernel, stride, list(_pair(padding)), list(_pair(dilation)), bool(ceil_mode)


# Below this many elements the zero tensors cost less than the Python-level autograd Functions:
# on the benchmark's MLP (activations of 512 x 24) a product is slower through them than through
# PyTorch's double-backward (measured in ``benchmarks/results/hessian.md``, section 1).
MIN_NUMEL = 1 << 16

_RELU = {F.relu, torch.relu, Tensor.relu}
_RELU_INPLACE = {F.relu_, torch.relu_, Tensor.relu_}
_MAX_POOL = {F.max_pool2d, F._max_pool2d, torch.max_pool2d}


class lean_piecewise_linear(TorchFunctionMode):  # noqa: N801 - used as a context manager
    """Within the block, ReLU and 2D max-pooling calls on inputs that need a gradient go
    through :class:`_Relu` and :class:`_MaxPool2d`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else kwargs.get("input")
        if (isinstance(x, Tensor) and x.requires_grad and x.numel() >= MIN_NUMEL
                and torch.is_grad_enabled()):
            if func in _RELU:
                inplace = bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
                return _Relu.apply(x, inplace)
            if func in _RELU_INPLACE:
                return _Relu.apply(x, True)
            if func in _MAX_POOL:
                rest = {k: v for k, v in kwargs.items() if k != "input"}
                geometry = _pool_geometry(x, *args[1:], **rest)
                if geometry is not None:
                    return _MaxPool2d.apply(x, geometry)
        return func(*args, **kwargs)
