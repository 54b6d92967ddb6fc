"""Small pieces the stateful and cost-saving methods share: norms over a set of named tensors,
the key a parameter's state is stored under, and per-example losses from a batch-mean loss_fn."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flatminima._nn import LossFn
from flatminima.methods._passes import Passes

# Errors a loss_fn may raise under ``torch.func.vmap`` (data-dependent control flow, ``.item()``,
# an op without a batching rule); the per-example losses are then computed one by one.
_VMAP_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError)


def global_norm(tensors: Mapping[str, Tensor]) -> float:
    """``sqrt(sum ||t||^2)`` over all tensors: each tensor's norm in its own dtype (no float64
    copy of the weights, which cost more than the rest of a cheap step), the sum across tensors
    in float64."""
    if not tensors:
        return 0.0
    norms = [torch.linalg.vector_norm(t).double() for t in tensors.values()]
    return float(torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms])))


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """``sum <a_n, b_n>`` over the names of ``a``: each product in the tensors' dtype, the sum
    across tensors in float64."""
    if not a:
        return 0.0
    return float(sum(torch.vdot(a[n].reshape(-1), b[n].reshape(-1).to(a[n].dtype)).double()
                     for n in a))


def all_finite(tensors: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def state_key(step: Passes, name: str) -> str:
    """The name a parameter's state is kept under: without DDP's ``module.`` prefix, so that a
    state saved by a single-process run loads into a DDP one and back."""
    return name[len("module."):] if step.ddp and name.startswith("module.") else name


def as_like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` on ``p``'s device and in its dtype (a state loaded from a CPU checkpoint)."""
    return t if t.device == p.device and t.dtype == p.dtype else t.to(p.device, p.dtype)


def take_rows(x: Any, rows: Tensor) -> Any:
    """The examples ``rows`` of a batch: a tensor, or a list, tuple or dict of tensors."""
    if isinstance(x, Tensor):
        return x[rows.to(x.device)]
    if isinstance(x, Mapping):
        return {k: take_rows(v, rows) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(take_rows(v, rows) for v in x)
    raise ValueError(f"cannot select examples from a batch of type {type(x).__name__}")


def concat_rows(parts: list[Any]) -> Any:
    """The batches ``parts`` joined along the examples (tensors, or lists, tuples or dicts)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, Mapping):
        return {k: concat_rows([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(concat_rows(list(items)) for items in zip(*parts, strict=True))
    raise ValueError(f"cannot join batches of type {type(first).__name__}")


def per_example_losses(loss_fn: LossFn, outputs: Tensor, targets: Any) -> Tensor:
    """``loss_fn`` of each example alone (``loss_fn`` returns the batch mean, so a batch of one
    gives that example's loss); one vmapped call where the loss allows it."""
    n = outputs.shape[0]
    if isinstance(targets, Tensor):
        try:
            return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(
                outputs, targets)
        except _VMAP_ERRORS:
            pass
    return torch.stack([loss_fn(outputs[i:i + 1], take_rows(targets, torch.arange(i, i + 1)))
                        for i in range(n)])
