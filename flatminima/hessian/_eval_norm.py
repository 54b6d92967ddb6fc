"""Batch normalization in eval mode as the affine map it is, for cheaper second derivatives.

In eval mode ``BatchNorm`` computes ``y = (x - mu) / sqrt(var + eps) * gamma + beta`` with fixed
running statistics ``mu, var``: an affine map of ``x``, ``y = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mu * s``. PyTorch differentiates its fused
kernel twice through a general double-backward that also carries the batch-statistics terms of
train mode; writing the same function as ``x * s + t`` makes every Hessian-vector product about
1.4x cheaper on a CNN with BatchNorm (237 against 331 ms in ``benchmarks/results/hessian.md``).
The value and all derivatives are the same function's, equal up to rounding.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _affine_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = self.weight * scale
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


def eval_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm modules that normalise with running statistics (eval mode, tracked)."""
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and not m.training and m.running_mean is not None
        and m.running_var is not None and "forward" not in m.__dict__
    ]


@contextlib.contextmanager
def affine_batchnorm(modules: list[_BatchNorm]) -> Iterator[None]:
    """Within the block, ``modules`` compute ``x * s + t`` instead of the fused kernel."""
    for m in modules:
        m.forward = types.MethodType(_affine_forward, m)
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
