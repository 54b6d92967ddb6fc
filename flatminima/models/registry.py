"""Models by name: ``create_model(name, num_classes, input_shape, **kw)``, ``list_models()``.

Each architecture file registers its builders with :func:`register_model`; a builder takes
``num_classes``, ``input_shape`` (with a default: the input the architecture is made for) and
its own keyword options and returns an ``nn.Module``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

Builder = Callable[..., nn.Module]
_MODELS: dict[str, Builder] = {}


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes, input_shape, **kw)`` under ``name``.

    The builder's ``input_shape`` needs a default: :func:`create_model` uses it when the caller
    gives no shape."""

    def deco(fn: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        param = inspect.signature(fn).parameters.get("input_shape")
        if param is None or param.default is inspect.Parameter.empty:
            raise TypeError(f"builder of {name!r} needs an input_shape parameter with a default")
        _MODELS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def create_model(name: str, num_classes: int = 10, input_shape: Sequence[int] | None = None,
                 **kw: Any) -> nn.Module:
    """Build model ``name`` for ``num_classes`` outputs and inputs of shape ``input_shape``
    (without the batch dimension). Options are the builder's keywords (see each model).

    Without ``input_shape`` the builder's own default stands: ``(3, 224, 224)`` for ``vit_b16``,
    ``resnet50`` and ``resnet101``, ``(40,)`` (MNIST-1D) for ``mlp`` and ``cnn1d``, and
    ``(3, 32, 32)`` (CIFAR) for the others."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"input_shape must be positive sizes, got {tuple(input_shape)!r}")
        kw["input_shape"] = shape
    return _MODELS[name](num_classes=num_classes, **kw)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter entries (shared tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def image_shape(input_shape: tuple[int, ...], model: str) -> tuple[int, int, int]:
    """``(C, H, W)`` from an input shape, with a clear error for non-image shapes."""
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs image inputs (C, H, W), got input_shape {input_shape}")
    return input_shape  # type: ignore[return-value]


__all__ = ["register_model", "list_models", "create_model", "count_parameters"]
