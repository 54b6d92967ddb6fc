"""Plain empirical risk: the gradient of ``L(w)``."""

from __future__ import annotations

from flatminima.methods._base import Method
from flatminima.methods._passes import Passes, StepResult, weighted_gradient
from flatminima.methods._registry import register_method


@register_method("baseline")
class Baseline(Method):
    """``grad L(w)``: one forward/backward, the reference every other method is compared with.

    Example::

        method = fm.Baseline()
        result = method.backward(model, x, y)
        opt.step(); opt.zero_grad()
    """

    runs_sharded = True  # one pass at w: FSDP2 gathers, reduces and shards as for any model

    def _backward(self, step: Passes, generator) -> StepResult:
        return weighted_gradient(step, lambda mb: [(1.0, None)])
