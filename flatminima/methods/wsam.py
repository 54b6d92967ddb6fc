"""Weighted sharpness-aware minimization (WSAM), Yue et al. 2023."""

from __future__ import annotations

from typing import Any

from torch import nn

from flatminima._checks import check_nonneg
from flatminima._params import select_params
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import MicroBatch, Passes
from flatminima.methods._registry import register_method
from flatminima.methods.sam import SAM, Grads, add_to_grad


def _check_gamma(value: Any, name: str) -> float:
    number = check_nonneg(value, name)
    if number >= 1:
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return number


@register_method("wsam")
class WSAM(SAM):
    """``(1 - k) * g + k * g_p``, ``k = gamma / (1 - gamma)``: sharpness as a weighted regularizer.

    Yue et al., "Sharpness-Aware Minimization Revisited: Weighted Sharpness as a Regularization
    Term" (KDD 2023); official code ``WeightedSAM`` in
    https://github.com/intelligent-machine-learning/dlrover (``atorch/optimizers/wsam.py``), also
    ``WSAM`` in pytorch_optimizer. The objective weighs the sharpness ``L(w + e) - L(w)``::

        L_WSAM(w) = L(w) + gamma / (1 - gamma) * (L(w + e) - L(w)),  e = rho * g / ||g||

    whose gradient (SAM's, ``e`` held fixed) is ``(1 - k) g + k g_p`` with ``g = grad L(w)``,
    ``g_p = grad L(w + e)``: ``gamma = 0`` is the plain gradient, ``gamma = 1/2`` is SAM. The
    paper's default "decoupled" variant lets the optimizer step on ``g`` and adds
    ``-lr * k * (g_p - g)`` outside it (past its momentum); a gradient estimator cannot reach
    past the optimizer, so this is the coupled variant (official ``decouple=False``). The
    official code also clips each gradient to norm ``max_norm``; clip the result yourself.

    Example::

        method = fm.create_method("wsam", rho=0.05, gamma=0.9)
    """

    gamma = hparam(0.9, _check_gamma,
                   "sharpness weight, in [0, 1): its coefficient is gamma / (1 - gamma) (official "
                   "README: 0.9).")

    def _gradient_params(
        self, step: Passes, params: dict[str, nn.Parameter]
    ) -> dict[str, nn.Parameter]:
        return select_params(step.model)  # the clean term reaches every parameter

    def _descend(
        self, unit: list[MicroBatch], e: Grads, g: Grads, weight: float,
        params: dict[str, nn.Parameter],
    ) -> bool:
        k = float(self.gamma) / (1.0 - float(self.gamma))
        # The clean term is known from sweep 1: written, not recomputed by a third pass.
        add_to_grad(unit[0].step, params, {n: (1.0 - k) * weight * t for n, t in g.items()})
        for mb in unit:
            mb.backward(mb.forward(e, final=True).loss * k)
        return True
