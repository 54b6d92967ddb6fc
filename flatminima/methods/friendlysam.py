"""Friendly sharpness-aware minimization (F-SAM), Li et al. 2024."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from flatminima._checks import check_nonneg, check_unit_interval
from flatminima.methods._gradients import as_like, state_key
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import Passes, StepResult
from flatminima.methods._registry import register_method
from flatminima.methods.sam import SAM, Grads


@register_method("friendlysam")
class FriendlySAM(SAM):
    """``grad L(w + e)``, ``e = rho * d / ||d||``, ``d = g - sigma * m``: SAM along the noise.

    Li, Zhou, He, Cheng, Huang, "Friendly Sharpness-Aware Minimization" (CVPR 2024); official
    code https://github.com/nblt/F-SAM (``utils.py``, ``FriendlySAM``). ``m`` is an exponential
    moving average of past clean gradients ``g = grad L(w)``, an estimate of the full-data
    gradient; removing it leaves the batch's stochastic gradient noise as the ascent direction.
    As the official code does, step ``t`` ascends along ``d_t = g_t - sigma * m_{t-1}`` and then
    updates ``m_t = lmbda * m_{t-1} + (1 - lmbda) * g_t``; the first step starts ``m_1 = g_1`` and
    ascends along ``g_1`` (plain SAM).

    The estimate is state: it is in ``state_dict()`` (``"momentum"``, by parameter name without
    DDP's ``module.`` prefix) and a resumed run continues from it. It covers the perturbed
    parameters (``params``), is updated once per call from the full batch (also with
    micro-batches or ``m=``: each group ascends along its own ``g_k - sigma * m``), and not on a
    step skipped for overflow. Under DDP each rank keeps its own, from its own batch; a
    checkpoint holds the one of the rank that saved it.

    Example::

        method = fm.create_method("friendlysam", rho=0.05, sigma=1.0, lmbda=0.9)
    """

    sigma = hparam(1.0, check_nonneg,
                   "weight of the removed full-gradient estimate, >= 0 (paper: 1).")
    lmbda = hparam(0.9, check_unit_interval,
                   "decay of the moving average, in [0, 1] (official default 0.9; its CIFAR "
                   "script: 0.6 with rho=0.2).")

    _observes_gradient: ClassVar[bool] = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._momentum: dict[str, Tensor] | None = None
        self._key: Callable[[str], str] = str

    def _backward(self, step: Passes, generator) -> StepResult:
        # The estimate is kept by parameter name without DDP's ``module.`` prefix, so that a
        # state saved by a single-process run resumes under DDP and back.
        self._key = functools.partial(state_key, step)
        return super()._backward(step, generator)

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        m = self._estimate(params)
        if m is not None:
            grads = {n: g - float(self.sigma) * m[n] for n, g in grads.items()}
        return super()._ascent(params, grads)

    def _observe(self, g: Grads) -> None:
        if self._momentum is None:
            self._momentum = {self._key(n): t.detach().clone() for n, t in g.items()}
            return
        lam = float(self.lmbda)
        for n, t in g.items():
            self._momentum[self._key(n)].mul_(lam).add_(t, alpha=1.0 - lam)

    def _estimate(self, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor] | None:
        """The estimate ``m`` on the parameters' device and dtype; a ``ValueError`` if it was
        built for other parameters (another model or selection)."""
        m = self._momentum
        if m is None:
            return None
        keys = {n: self._key(n) for n in params}
        if set(m) != set(keys.values()) or any(m[keys[n]].shape != p.shape
                                               for n, p in params.items()):
            raise ValueError("FriendlySAM's gradient estimate (momentum) was built for other "
                             f"parameters than {sorted(keys.values())[:3]}...; load a matching "
                             "state_dict or use a fresh method")
        self._momentum = {k: as_like(m[k], params[n]) for n, k in keys.items()}
        return {n: self._momentum[k] for n, k in keys.items()}

    def state_dict(self) -> dict[str, Any]:
        """The hyperparameters and, after the first call, the estimate ``"momentum"``."""
        state = super().state_dict()
        if self._momentum is not None:
            state["momentum"] = {n: t.detach().clone() for n, t in self._momentum.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        momentum = state.pop("momentum", None)
        super().load_state_dict(state)
        self._momentum = (None if momentum is None
                          else {str(n): t.detach().clone() for n, t in momentum.items()})
