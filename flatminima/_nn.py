"""Model plumbing shared by the methods and the measurements (no method or measurement here).

* :data:`LossFn`, the loss signature ``loss_fn(outputs, targets) -> 0-d mean``;
* :func:`model_device`, where a model's parameters live;
* :func:`primary_output`, the tensor a model's output stands for (the first element of a tuple);
* :class:`ModelLoss`, a loss that runs the model itself (a batch dict, the model's own loss);
* :func:`is_fully_sharded`, whether a model is sharded with FSDP2 (``fully_shard``);
* :func:`is_norm_layer` and :func:`frozen_norm_stats`: normalization layers, and training-mode
  forwards that normalize with batch statistics but update no running statistics;
* :func:`filter_rows` and :func:`gaussian_like`: the per-filter view of a weight tensor and a
  Gaussian draw shaped like a set of parameters.
"""

from __future__ import annotations

import contextlib
import re
import sys
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


class MissingOutputs:
    """The outputs of a pass whose :class:`ModelLoss` returned only a loss: any use of them (a
    method that reads the logits, as NRS's divergence does) is a ``ValueError`` saying so."""

    def detach(self) -> MissingOutputs:
        return self

    def __getattr__(self, name: str) -> Any:
        raise ValueError(
            "this method reads the model's outputs (logits), but the loss function returned only "
            "a loss: make it return (loss, outputs)"
        )


class ModelLoss:
    """A ``loss_fn`` that runs the model itself: ``fn(model, inputs, targets)`` returns the loss
    (a 0-d mean) or a pair ``(loss, outputs)``.

    The plain ``loss_fn(outputs, targets)`` is handed ``model(inputs)``; a ``ModelLoss`` is for
    what that cannot say: a batch dict the model takes as keyword arguments, a loss the model
    computes itself (Hugging Face models given ``labels``), a framework's own training-step loss.
    Each pass calls ``fn`` with the model's parameters at ``w + v`` (``torch.func``, as for the
    plain form), so every guarantee holds; ``targets`` may be anything (``None`` when the inputs
    carry the labels). ``outputs`` are the logits NRS's divergence and ``StepResult.logits``
    read (a tuple is read through its first element, as :func:`primary_output` does);
    without them a method that needs them says so.

    Example (a Hugging Face model whose batch holds the labels)::

        def own_loss(model, batch, targets):
            out = model(**batch)
            return out.loss, out.logits

        method.backward(hf_model, batch, None, ModelLoss(own_loss))
    """

    def __init__(self, fn: Callable[[nn.Module, Any, Any], Any]) -> None:
        if not callable(fn):
            raise ValueError(f"ModelLoss needs a callable (model, inputs, targets), got {fn!r}")
        self.fn = fn

    def run(self, model: nn.Module, inputs: Any, targets: Any) -> tuple[Any, Tensor]:
        """``(outputs, loss)`` of ``fn`` on ``model``; ``MissingOutputs`` for a loss alone."""
        out = self.fn(model, inputs, targets)
        if isinstance(out, Tensor):
            return MissingOutputs(), out
        if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], Tensor):
            return primary_output(out[1]), out[0]
        raise ValueError(
            f"a ModelLoss function must return a loss tensor or (loss, outputs), got "
            f"{type(out).__name__}"
        )

    def __call__(self, outputs: Any, targets: Any) -> Tensor:
        raise TypeError(
            "this method calls loss_fn(outputs, targets) itself (per-example losses), which a "
            "ModelLoss, running the model itself, cannot answer: pass a plain loss_fn"
        )

    def __repr__(self) -> str:
        return f"ModelLoss({self.fn!r})"


def is_fully_sharded(model: nn.Module) -> bool:
    """True when ``model`` or a submodule is sharded with FSDP2 (``fully_shard``).

    Importing ``torch.distributed.fsdp`` takes about 2 s, so it is only looked up when already
    imported (as it is wherever ``fully_shard`` was called).
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    kind = getattr(fsdp, "FSDPModule", None)
    return kind is not None and any(isinstance(m, kind) for m in model.modules())


# Normalizations of other libraries that do not subclass PyTorch's (timm's RmsNorm, RmsNorm2d,
# SimpleNorm, ...; Hugging Face models' T5LayerNorm, LlamaRMSNorm): known by a class name ending
# in Norm (with a 1d/2d/3d or Fp32 suffix) on a module without submodules. A head that merely
# contains a norm (timm's NormMlpClassifierHead) has submodules and is not one.
_NORM_NAME = re.compile(r"Norm([123]d)?(Fp32)?$")


def is_norm_layer(module: nn.Module) -> bool:
    """True for normalization layers: PyTorch's (BatchNorm, InstanceNorm, GroupNorm, LayerNorm,
    RMSNorm, LocalResponseNorm) and their subclasses, and another library's leaf module whose
    class name ends in ``Norm`` (``RmsNorm``, ``LayerNorm2dFp32``, ``LlamaRMSNorm``)."""
    if isinstance(module, _NORM_TYPES):
        return True
    return bool(_NORM_NAME.search(type(module).__name__)) and next(module.children(), None) is None


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
