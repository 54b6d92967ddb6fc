"""Plain empirical risk: the gradient of ``L(w)``."""

from __future__ import annotations

from typing import Any

from flatminima.methods._base import Method, StepResult, weighted_passes


class Baseline(Method):
    """``grad L(w)``: one forward/backward, the reference every other method is compared with.

    Example::

        method = fm.Baseline()
        result = method.backward(model, x, y)
        opt.step(); opt.zero_grad()
    """

    name = "baseline"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        return weighted_passes(model, micro, weights, loss_fn, scaler, [(1.0, None)])
