"""Gradient estimators that train toward flat minima, behind one API.

Every method computes the gradient of its objective at the current weights and accumulates it into
``p.grad``; any ``torch.optim`` optimizer then steps::

    method = fm.NRS(rho=0.05, alpha=1.0)
    result = method.backward(model, x, y)      # loss_fn defaults to cross-entropy
    opt.step(); opt.zero_grad(set_to_none=True)

``create_method(name, **hparams)`` builds one by its registry name (``list_methods()``). Each
method lives in its own module here and registers itself with ``@register_method``; every module
of this package is imported below, so a method added in a new file needs no other edit.
"""

from __future__ import annotations

import importlib
import pkgutil

from flatminima.methods._base import Method, RandomPerturbation
from flatminima.methods._hparams import argument, hparam, option
from flatminima.methods._passes import MicroBatch, Pass, Passes, StepResult, weighted_gradient
from flatminima.methods._registry import (
    METHODS,
    create_method,
    list_methods,
    method_class,
    register_method,
)
from flatminima.methods.baseline import Baseline
from flatminima.methods.esam import ESAM
from flatminima.methods.every import Every
from flatminima.methods.fisher_sam import FisherSAM
from flatminima.methods.friendlysam import FriendlySAM
from flatminima.methods.gam import GAM
from flatminima.methods.gcsam import GCSAM
from flatminima.methods.gsam import GSAM
from flatminima.methods.msam import MSAM
from flatminima.methods.nrs import NRS
from flatminima.methods.nso import NSO
from flatminima.methods.rpr import RPR
from flatminima.methods.rwp import RWP
from flatminima.methods.sam import ASAM, SAM
from flatminima.methods.smoothout import AdaSmoothOut, SmoothOut
from flatminima.methods.vasso import VaSSO
from flatminima.methods.wsam import WSAM

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Method", "RandomPerturbation", "StepResult", "Passes", "MicroBatch", "Pass",
    "weighted_gradient", "hparam", "option", "argument", "register_method", "method_class",
    "Baseline", "RPR", "NRS", "SAM", "ASAM", "NSO", "SmoothOut", "AdaSmoothOut", "RWP",
    "METHODS", "list_methods", "create_method",
    "MSAM", "ESAM", "VaSSO", "FisherSAM", "GAM", "GSAM", "WSAM", "GCSAM", "FriendlySAM",
    "Every",
]
