"""Variance-suppressed sharpness-aware optimization (VaSSO), Li & Giannakis, NeurIPS 2023."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from flatminima._checks import check_nonneg, check_unit_interval
from flatminima.methods._base import Method, poison_grads
from flatminima.methods._gradients import all_finite, as_like, global_norm, state_key
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import Passes, StepResult
from flatminima.methods._registry import register_method
from flatminima.methods.sam import clean_gradient


@register_method("vasso")
class VaSSO(Method):
    """``grad L(w + rho * d / ||d||)``, ``d <- (1 - theta) d + theta * grad L(w)`` (Li & Giannakis).

    Li, Giannakis, "Enhancing Sharpness-Aware Optimization Through Variance Suppression"
    (NeurIPS 2023); official code https://github.com/BingcongLi/VaSSO (``solver/vasso.py``).
    SAM's ascent follows one stochastic gradient, whose noise makes the adversary "friendly";
    VaSSO follows an exponential moving average of them instead::

        g = grad L(w)                       # this batch, all micro-batches
        d = g                   on the first call (the official code's initialization)
        d = (1 - theta) d + theta g        afterwards
        e = rho * d / ||d||
        grad = grad L(w + e)

    ``d`` is state: it lives between calls, is in ``state_dict()`` (``"ema"``, by parameter name,
    without DDP's ``module.`` prefix) and comes back with ``load_state_dict`` (``flatminima
    train``'s checkpoints keep it, so a resumed run continues the average). A fresh method starts
    a new average. It is updated once per call from the full-batch gradient (each DDP rank from
    its own, as the official code's per-process state is), and not at all on a call whose
    gradient is not finite (that step is skipped). Cost: SAM's two passes.

    Defaults from the official code: ``rho=0.05`` (``configs/defaulf_cfg.py``; its ``train.sh``
    uses 0.2 for WRN-28-10 on CIFAR-100) and ``theta=0.9``.

    Example::

        method = fm.VaSSO(rho=0.1, theta=0.4)
    """

    rho = hparam(0.05, check_nonneg, "ascent radius, >= 0 (official default 0.05).")
    theta = hparam(0.9, check_unit_interval,
                   "weight of the new gradient in the average, in [0, 1] (official: 0.9).")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._ema: dict[str, Tensor] = {}

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        params = self.selected_params(step)
        g = clean_gradient(list(step), params)
        finite = all_finite(g)
        if finite:
            theta = float(self.theta)
            d = {}
            for n, p in params.items():
                key = state_key(step, n)
                old = self._ema.get(key)
                d[n] = g[n].clone() if old is None else (1 - theta) * as_like(old, p) + theta * g[n]
            self._ema.update({state_key(step, n): t for n, t in d.items()})
            scale = float(self.rho) / (global_norm(d) + 1e-12)
            e = {n: t * scale for n, t in d.items()}
        else:  # a non-finite gradient: no update of d; the step is skipped (below)
            e = {n: torch.zeros_like(p) for n, p in params.items()}
        del g
        for mb in step:
            mb.backward(mb.forward(e, final=True).loss)
        if not finite:
            poison_grads(list(params.values()))
        return step.result()

    def state_dict(self) -> dict[str, Any]:
        """The hyperparameters and the moving average ``d`` (``"ema"``, by parameter name)."""
        return {**super().state_dict(), "ema": {k: t.detach().clone() for k, t in
                                                self._ema.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        ema = state.pop("ema", {})
        super().load_state_dict(state)
        self._ema = {str(k): t.detach().clone() for k, t in ema.items()}
