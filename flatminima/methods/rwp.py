"""Random weight perturbation (RWP), Li et al. 2022."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from flatminima import noise as noise_lib
from flatminima.methods._base import (
    Method,
    StepResult,
    check_nonneg,
    check_unit_interval,
    weighted_passes,
)


class RWP(Method):
    """``mix * grad L(w + u) + (1 - mix) * grad L(w)``, ``u ~ N(0, gamma^2 ||w_filter||^2)``.

    Li, Yan, He, Wu, Huang, "Efficient Generalization Improvement Guided by Random Weight
    Perturbation" (2022): filter-wise Gaussian noise whose standard deviation is ``gamma`` times the
    filter's norm, and a mixed loss of the clean and the perturbed gradient (``mix = 1`` is plain
    RWP, ``mix = 0.5`` the paper's mixed variant).

    Args:
        gamma: noise scale relative to each filter's norm, ``>= 0`` (paper: 0.01 on CIFAR).
        mix: weight of the perturbed gradient, in ``[0, 1]``.
        noise: optional sampler ``(params, generator) -> dict`` (overrides ``gamma``).
    """

    name = "rwp"
    _hparam_names = ("gamma", "mix")

    def __init__(
        self,
        gamma: float = 0.01,
        mix: float = 0.5,
        *,
        noise: Callable[..., dict[str, Tensor]] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.gamma, self.mix, self.noise = gamma, mix, noise
        self._validate()

    def _validate(self) -> None:
        check_nonneg(self.gamma, "gamma")
        check_unit_interval(self.mix, "mix")

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        params = self._perturbed_params(model)
        fn = self.noise or noise_lib.Sampler(self.gamma, "gaussian", "filter", relative=True)
        u = self._draw(fn, params, generator)
        mix = float(self.mix)
        return weighted_passes(model, micro, weights, loss_fn, scaler, [(1 - mix, None), (mix, u)])
