"""Model plumbing shared by the methods and the measurements (no method or measurement here).

* :data:`LossFn`, the loss signature ``loss_fn(outputs, targets) -> 0-d mean``;
* :func:`model_device`, where a model's parameters live;
* :func:`primary_output`, the tensor a model's output stands for (the first element of a tuple);
* :func:`is_norm_layer` and :func:`frozen_norm_stats`: normalization layers, and training-mode
  forwards that normalize with batch statistics but update no running statistics;
* :func:`filter_rows` and :func:`gaussian_like`: the per-filter view of a weight tensor and a
  Gaussian draw shaped like a set of parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]

# Layers whose parameters are scales and shifts of a normalization, not weights of a map. RMSNorm
# exists from torch 2.4 on.
_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(
    t for t in (
        nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
        getattr(nn, "RMSNorm", None),
    ) if t is not None
)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def primary_output(out: Any) -> Tensor:
    """The model output a loss is computed on: the tensor itself, or the first element of a
    tuple or list (models that also return features or auxiliary logits).

    Anything else is a ``ValueError`` naming what was returned.
    """
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(
        f"the model returned {type(out).__name__}; expected a tensor of outputs (logits) or a "
        "tuple whose first element is one"
    )


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalization layers (BatchNorm, InstanceNorm, GroupNorm, LayerNorm, RMSNorm,
    LocalResponseNorm)."""
    return isinstance(module, _NORM_TYPES)


def norm_param_names(model: nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of normalization-layer parameters."""
    return {
        f"{mn}.{pn}" if mn else pn
        for mn, m in model.named_modules()
        if is_norm_layer(m)
        for pn, _ in m.named_parameters(recurse=False)
    }


def tracking_norm_layers(model: nn.Module) -> list[nn.Module]:
    """The training-mode normalization layers that would update running statistics."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
    ]


@contextlib.contextmanager
def frozen_norm_stats(layers: nn.Module | Iterable[nn.Module]) -> Iterator[None]:
    """Training-mode forwards that normalize with batch statistics and update no statistic.

    ``layers`` is a model (its :func:`tracking_norm_layers` are found) or those layers, found
    once by a caller that enters this often. For BatchNorm (1d/2d/3d, SyncBatchNorm) switching
    ``track_running_stats`` off gives the same outputs in training mode (batch statistics),
    skips the in-place updates (which ``torch.func`` transforms also refuse) and leaves
    ``num_batches_tracked`` alone, which ``momentum=None`` uses. InstanceNorm updates its running
    statistics whenever it is handed them, so its buffers are detached for the duration instead.
    """
    found = tracking_norm_layers(layers) if isinstance(layers, nn.Module) else list(layers)
    hidden: list[tuple[nn.Module, Tensor | None, Tensor | None]] = []
    for m in found:
        m.track_running_stats = False
        if isinstance(m, nn.modules.instancenorm._InstanceNorm):
            hidden.append((m, m.running_mean, m.running_var))
            m.running_mean, m.running_var = None, None
    try:
        yield
    finally:
        for m in found:
            m.track_running_stats = True
        for m, mean, var in hidden:
            m.running_mean, m.running_var = mean, var


def filter_rows(t: Tensor) -> Tensor:
    """``t`` as ``(filters, entries)``: each slice along dim 0 is a row (an output unit or a
    convolution filter); a 1-D or 0-d tensor (a bias, a norm scale) has one entry per row."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)


def gaussian_like(
    params: Mapping[str, Tensor], generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Independent ``N(0, 1)`` entries shaped like each tensor of ``params``.

    Drawn on the generator's device (a CPU generator cannot drive a CUDA kernel) and moved to
    each parameter's, so a seed gives the same draw on every device.
    """
    device = generator.device if generator is not None else None
    return {
        n: torch.randn(p.shape, generator=generator, device=device or p.device,
                       dtype=p.dtype).to(p.device)
        for n, p in params.items()
    }
