"""Batch normalization in eval mode as the affine map it is, for cheaper second derivatives.

In eval mode ``BatchNorm`` computes ``y = (x - mu) / sqrt(var + eps) * gamma + beta`` with fixed
running statistics ``mu, var``: an affine map of ``x``, ``y = x * s + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mu * s``. PyTorch differentiates its fused
kernel twice through a general double-backward that also carries the batch-statistics terms of
train mode; writing the same function as ``x * s + t`` leaves only the elementwise products to
differentiate, which makes every Hessian-vector product cheaper on a CNN with BatchNorm (measured
in ``benchmarks/results/hessian.md``, section 1).

Better still, when the BatchNorm's input is the output of a convolution or linear layer used by
nothing else, the map folds into that layer (the inference-time "BN folding", here kept
differentiable in every parameter):

    BN(conv(x; W, b)) = conv(x; W * s, b * s + t)      (s scales each output channel),

so the products multiply the few weights by ``s`` instead of every activation, in the forward
pass, its backward and the backward of that. :func:`find_folds` looks for such pairs in one
probe forward pass and accepts a pair only if it can show it exact: each module called once, the
norm's input *is* the layer's output, and the autograd graph of the model's output has exactly
one edge into that output's node (the norm's), so no other consumer, view or in-place change
sees it. The value and all derivatives are the same function's, equal up to rounding.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

# Layers whose output channels can absorb a per-channel scale and shift (weight dim 0 = output
# channel; transposed convolutions are not among them).
FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _scale_shift(norm: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``s, t`` with ``norm(x) = x * s + t`` per channel (read at call time, so that
    ``functional_call``'s substituted parameters are the ones used)."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = norm.weight * scale
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def _affine_forward(self: _BatchNorm, x: Tensor) -> Tensor:
    scale, shift = _scale_shift(self)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * scale.view(shape) + shift.view(shape)


def _folded_forward(layer: nn.Module, norm: _BatchNorm) -> Callable[[Tensor], Tensor]:
    def forward(x: Tensor) -> Tensor:
        scale, shift = _scale_shift(norm)
        weight = layer.weight * scale.view((-1,) + (1,) * (layer.weight.dim() - 1))
        bias = shift if layer.bias is None else layer.bias * scale + shift
        if isinstance(layer, nn.Linear):
            return F.linear(x, weight, bias)
        return layer._conv_forward(x, weight, bias)

    return forward


def _identity(x: Tensor) -> Tensor:
    return x


def eval_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm modules that normalise with running statistics (eval mode, tracked)."""
    return [
        m for m in model.modules()
        if isinstance(m, _BatchNorm) and not m.training and m.running_mean is not None
        and m.running_var is not None and "forward" not in m.__dict__
    ]


def find_folds(model: nn.Module, norms: list[_BatchNorm], params: dict[str, Tensor],
               example: Tensor) -> list[tuple[nn.Module, _BatchNorm]]:
    """The ``(layer, norm)`` pairs among ``norms`` that fold exactly (see the module docstring),
    found in one forward pass of ``example`` at ``params`` (all parameters of the model)."""
    if not norms:
        return []
    layers = [m for m in model.modules() if isinstance(m, FOLDABLE) and "forward" not in m.__dict__]
    seen: dict[int, list] = {}          # id(module) -> [(input, output, output's grad_fn)]

    def record(module: nn.Module, args: tuple, out: object) -> None:
        x = args[0] if args else None
        seen.setdefault(id(module), []).append(
            (x, out, getattr(out, "grad_fn", None)))

    handles = [m.register_forward_hook(record) for m in (*layers, *norms)]
    try:
        with torch.enable_grad():
            probe = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            out = torch.func.functional_call(model, probe, (example,))
    except Exception:  # noqa: BLE001 - e.g. a model that needs the full batch size: no folding
        return []
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor) or out.grad_fn is None:
        return []
    by_output = {}
    for layer in layers:
        calls = seen.get(id(layer), [])
        if len(calls) == 1 and isinstance(calls[0][1], Tensor) and calls[0][2] is not None:
            by_output[id(calls[0][1])] = (layer, calls[0])
    edges = _edge_counts(out.grad_fn)
    folds = []
    for norm in norms:
        calls = seen.get(id(norm), [])
        if len(calls) != 1 or id(calls[0][0]) not in by_output:
            continue
        layer, (_, layer_out, layer_node) = by_output[id(calls[0][0])]
        if layer_out is not calls[0][0] or calls[0][2] is None:
            continue
        channels = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        if channels != norm.num_features or (isinstance(layer, nn.Linear) and layer_out.dim() != 2):
            continue
        # Exactly one edge into the layer output's node, and it comes from the norm's node.
        if edges.get(layer_node, 0) != 1 or layer_node is out.grad_fn:
            continue
        if not any(nxt is layer_node for nxt, _ in calls[0][2].next_functions):
            continue
        folds.append((layer, norm))
    # A consumer outside autograd (a detached copy of the layer's output) would leave no edge:
    # the folded model must also give the same output, up to rounding.
    if folds:
        with torch.no_grad(), affine_batchnorm(norms, folds):
            again = torch.func.functional_call(model, params, (example,))
        out = out.detach()
        tol = 1e-3 if out.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
        if not torch.allclose(again, out, rtol=tol, atol=tol * float(out.abs().max())):
            return []
    return folds


def _edge_counts(root: object) -> dict[object, int]:
    """For every autograd node reachable from ``root``: how many edges point to it."""
    counts: dict[object, int] = {}
    stack, visited = [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is None:
                continue
            counts[nxt] = counts.get(nxt, 0) + 1
            if nxt not in visited:
                visited.add(nxt)
                stack.append(nxt)
    return counts


@contextlib.contextmanager
def affine_batchnorm(modules: list[_BatchNorm],
                     folds: list[tuple[nn.Module, _BatchNorm]] = ()) -> Iterator[None]:
    """Within the block, ``modules`` compute ``x * s + t`` instead of the fused kernel, and for
    each ``(layer, norm)`` of ``folds`` the layer computes both and the norm passes through."""
    folded = {id(norm) for _, norm in folds}
    for m in modules:
        if id(m) not in folded:
            m.forward = types.MethodType(_affine_forward, m)
    for layer, norm in folds:
        layer.forward = _folded_forward(layer, norm)
        norm.forward = _identity
    try:
        yield
    finally:
        for m in modules:
            m.__dict__.pop("forward", None)
        for layer, norm in folds:
            layer.__dict__.pop("forward", None)
            norm.__dict__.pop("forward", None)
