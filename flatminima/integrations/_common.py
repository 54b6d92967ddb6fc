"""Plumbing the adapters share: the one-line ImportError of a missing extra, and the scaling of a
framework's gradient accumulation."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from torch import Tensor


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` or raise a one-line ``ImportError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"flatminima.integrations.{extra} needs {what}: pip install 'flatminima[{extra}]' "
            f"({e})"
        ) from None


class ScaledBackward:
    """A ``scaler=`` for ``Method.backward`` that multiplies every backward by ``factor`` (and by
    the real ``torch.amp.GradScaler``'s scale, when one is given).

    A framework that accumulates gradients over ``k`` micro-batches runs one ``backward`` call
    per micro-batch and wants each to add ``(1/k) * gradient``. Scaling the objective before each
    backward (rather than ``p.grad`` afterwards) also holds under DDP, where the last backward
    all-reduces the accumulated sum, and lets a method read its unscaled gradients back:
    ``get_scale()`` includes the factor, as the pass primitive's unscaling expects.
    """

    def __init__(self, scaler: Any, factor: float) -> None:
        self.scaler = scaler
        self.factor = float(factor)

    def scale(self, t: Tensor) -> Tensor:
        return (self.scaler.scale(t) if self.scaler is not None else t) * self.factor

    def get_scale(self) -> float:
        base = float(self.scaler.get_scale()) if self.scaler is not None else 1.0
        return base * self.factor

    def __getattr__(self, name: str) -> Any:
        if self.scaler is None:
            raise AttributeError(name)
        return getattr(self.scaler, name)


def backward_scaler(scaler: Any, factor: float) -> Any:
    """``scaler`` itself when ``factor`` is 1 (a plain call), else a :class:`ScaledBackward`."""
    return scaler if factor == 1.0 else ScaledBackward(scaler, factor)
