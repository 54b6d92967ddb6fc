"""flatminima: train neural networks toward flat minima and measure how flat a minimum is."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from flatminima import methods, noise
from flatminima.methods import (
    ASAM,
    ESAM,
    GAM,
    GCSAM,
    GSAM,
    MSAM,
    NRS,
    NSO,
    RPR,
    RWP,
    SAM,
    WSAM,
    AdaSmoothOut,
    Baseline,
    Every,
    FisherSAM,
    FriendlySAM,
    Method,
    SmoothOut,
    StepResult,
    VaSSO,
    create_method,
    list_methods,
)

__version__ = "0.1.0"

# Submodules loaded on first access, so `import flatminima` stays light and a missing optional
# piece never breaks the rest.
_LAZY_MODULES = ("hessian", "divergence", "landscape", "volume", "data", "models", "experiment",
                 "plots")


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return import_module(f"flatminima.{name}")
    raise AttributeError(f"module 'flatminima' has no attribute {name!r}")


__all__ = [
    "noise", "methods", "Method", "StepResult", "Baseline", "RPR", "NRS", "SAM", "ASAM", "NSO",
    "SmoothOut", "AdaSmoothOut", "RWP", "create_method", "list_methods", "__version__",
    "MSAM", "ESAM", "VaSSO", "FisherSAM", "GAM", "GSAM", "WSAM", "GCSAM", "FriendlySAM", "Every",
]
