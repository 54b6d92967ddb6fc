"""Gradient estimators that train toward flat minima, behind one API.

Every method computes the gradient of its objective at the current weights and accumulates it into
``p.grad``; any ``torch.optim`` optimizer then steps::

    method = fm.NRS(rho=0.05, alpha=1.0)
    result = method.backward(model, x, y)      # loss_fn defaults to cross-entropy
    opt.step(); opt.zero_grad(set_to_none=True)

``create_method(name, **hparams)`` builds one by its registry name (``list_methods()``).
"""

from __future__ import annotations

from typing import Any

from flatminima.methods._base import Method, StepResult
from flatminima.methods.baseline import Baseline
from flatminima.methods.nrs import NRS
from flatminima.methods.nso import NSO
from flatminima.methods.rpr import RPR
from flatminima.methods.rwp import RWP
from flatminima.methods.sam import ASAM, SAM
from flatminima.methods.smoothout import AdaSmoothOut, SmoothOut

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Baseline, RPR, NRS, SAM, ASAM, NSO, SmoothOut, AdaSmoothOut, RWP)
}


def list_methods() -> list[str]:
    """Registry names of all methods."""
    return list(METHODS)


def create_method(name: str, **hparams: Any) -> Method:
    """Build a method by registry name; unknown names or arguments raise ``ValueError``."""
    key = name.lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    try:
        return METHODS[key](**hparams)
    except TypeError as e:
        raise ValueError(f"bad argument for method {name!r}: {e}") from None


__all__ = [
    "Method", "StepResult", "Baseline", "RPR", "NRS", "SAM", "ASAM", "NSO", "SmoothOut",
    "AdaSmoothOut", "RWP", "METHODS", "list_methods", "create_method",
]
