"""PyHessian, when installed (it is not a dependency of flatminima), and what the sections need
around it: an instance on the same model and data, a counter of its products, and a guard that
restricts its parameters to a subset.

``pyhessian`` is None where the import fails; every section then measures flatminima alone and
the report leaves PyHessian's rows out.
"""

from __future__ import annotations

import sys

import torch.nn.functional as F
from _fixtures import clock
from torch import nn

try:
    import pyhessian
    from pyhessian import hessian as PyHessian

    # The package re-exports the class under the module's name: take the module itself.
    pyh_mod = sys.modules["pyhessian.hessian"]
except ImportError:  # pragma: no cover - reported in the output
    pyhessian = PyHessian = pyh_mod = None


def version() -> str:
    """PyHessian's version for the results (its PyPI release has no ``__version__``)."""
    if pyhessian is None:
        return "not installed"
    return getattr(pyhessian, "__version__", "0.1 (PyPI)")


class _Converged(Exception):
    """Raised inside a recorded run once the estimate has settled within the tolerance."""


class Counter:
    """Counts calls of PyHessian's hessian_vector_product, optionally recording v^T H v.

    With ``stop_at=(ref, rtol)`` the recorded run is cut once 5 consecutive estimates are within
    ``rtol`` of ``ref`` (the oracle stop needs no more of the trajectory).
    """

    def __init__(self, record: bool = False, stop_at: tuple[float, float] | None = None
                 ) -> None:
        self.calls, self.record, self.trace, self.stop_at = 0, record, [], stop_at
        self.t0 = clock()
        self._orig = pyh_mod.hessian_vector_product
        # Dataset mode: one call of dataloader_hv_product is one product over all batches.
        self._orig_loader = PyHessian.dataloader_hv_product

    def _count(self, rq: float | None) -> None:
        self.calls += 1
        if self.record:
            self.trace.append((self.calls, clock() - self.t0, rq))
            if self.stop_at is not None and len(self.trace) >= 5:
                ref, rtol = self.stop_at
                if all(abs(t[2] - ref) <= rtol * abs(ref) for t in self.trace[-5:]):
                    raise _Converged

    def __enter__(self) -> Counter:
        def wrapped(grads, params, v):
            hv = self._orig(grads, params, v)
            rq = (float(sum((a * b).sum() for a, b in zip(hv, v, strict=True)))
                  if self.record else None)
            self._count(rq)
            return hv

        orig_loader = self._orig_loader

        def wrapped_loader(hc, v):
            rq, hv = orig_loader(hc, v)
            self._count(rq)
            return rq, hv

        pyh_mod.hessian_vector_product = wrapped
        PyHessian.dataloader_hv_product = wrapped_loader
        return self

    def __exit__(self, exc_type, *exc) -> bool:
        pyh_mod.hessian_vector_product = self._orig
        PyHessian.dataloader_hv_product = self._orig_loader
        return exc_type is _Converged


def pyhessian_for(model, data):
    """PyHessian on one batch (graph kept) or, for a list of batches, in its dataloader mode."""
    # PyHessian calls loss.backward(create_graph=True): stale .grad from an earlier instance
    # would be added into its gradient (and so into its Hessian). Start from clean grads.
    model.zero_grad(set_to_none=True)
    if isinstance(data, list):
        return PyHessian(model, F.cross_entropy, dataloader=data, cuda=False)
    return PyHessian(model, F.cross_entropy, data=data, cuda=False)


class only_trainable:
    """PyHessian measures every parameter with requires_grad: freeze the others meanwhile."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        self.model, self.names = model, names

    def __enter__(self) -> None:
        if self.names is not None:
            for n, p in self.model.named_parameters():
                p.requires_grad_(n in self.names)

    def __exit__(self, *exc) -> None:
        for p in self.model.parameters():
            p.requires_grad_(True)
