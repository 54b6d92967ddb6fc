"""Random perturbation (RPR): the gradient of the loss at a random point of the neighbourhood."""

from __future__ import annotations

from flatminima.methods._neighbourhood import Neighbourhood
from flatminima.methods._passes import Passes, StepResult, weighted_gradient
from flatminima.methods._registry import register_method


@register_method("rpr")
class RPR(Neighbourhood):
    """``grad L(w + u)``, ``u`` random in the neighbourhood of radius ``rho`` (NRS paper's RPR).

    The control of Zhao & Zhang (2022), Sec. 4: the same random perturbation as NRS but without
    the divergence and the clean loss. By default ``u`` is uniform in the ball of radius
    ``rho * ||w_filter||`` for every filter (see ``fm.noise``). The clean loss reported in the
    result comes from a forward pass without a graph, which also updates the BatchNorm
    statistics. Micro-batches share one ``u``.

    Example::

        method = fm.RPR(rho=0.05)
        method.backward(model, x, y); opt.step(); opt.zero_grad()
    """

    def _backward(self, step: Passes, generator) -> StepResult:
        u = self.draw(step, generator)
        return weighted_gradient(step, lambda mb: [(0.0, None), (1.0, u)])
