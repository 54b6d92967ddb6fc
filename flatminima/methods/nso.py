"""Noise stability optimization (NSO), Ju et al. 2023."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from flatminima import noise as noise_lib
from flatminima.methods._base import (
    Method,
    StepResult,
    check_nonneg,
    check_positive_int,
    check_unit_interval,
    weighted_passes,
)


class NSO(Method):
    """``lam * grad L(w) + (1 - lam)/(2k) * sum_i [grad L(w + u_i) + grad L(w - u_i)]``.

    Ju, Li, Zhang, "Noise Stability Optimization for Flat Minima with Tight Rates" (2023). The
    two-sided samples ``u_i ~ N(0, sigma^2 I)`` cancel the first-order term of the noise, leaving a
    penalty on the Hessian trace ``sigma^2/2 * tr(H)``. As in the authors' code the noise is
    absolute (the same ``sigma`` for every parameter), all samples use the same batch, and the
    clean pass (without a graph when ``lam = 0``) updates the BatchNorm statistics.

    Args:
        sigma: standard deviation of the weight noise, ``>= 0`` (authors' scripts: 0.01).
        num_samples: number ``k`` of two-sided samples, ``>= 1``.
        lam: weight of the clean gradient, in ``[0, 1]`` (authors' scripts: 0).
        noise: optional sampler ``(params, generator) -> dict`` for ``u_i`` (overrides ``sigma``).
    """

    name = "nso"
    _hparam_names = ("sigma", "num_samples", "lam")

    def __init__(
        self,
        sigma: float = 0.01,
        num_samples: int = 1,
        lam: float = 0.0,
        *,
        noise: Callable[..., dict[str, Tensor]] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.sigma, self.num_samples, self.lam, self.noise = sigma, num_samples, lam, noise
        self._validate()

    def _validate(self) -> None:
        check_nonneg(self.sigma, "sigma")
        check_positive_int(self.num_samples, "num_samples")
        check_unit_interval(self.lam, "lam")

    def _noise_fn(self) -> Callable[..., dict[str, Tensor]]:
        if self.noise is not None:
            return self.noise
        return noise_lib.Sampler(self.sigma, "gaussian", "element", relative=False)

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        params = self._perturbed_params(model)
        k = self.num_samples
        c = (1.0 - float(self.lam)) / (2 * k)
        terms: list[tuple[float, dict[str, Tensor] | None]] = [(float(self.lam), None)]
        for _ in range(k):
            u = self._draw(self._noise_fn(), params, generator)
            terms += [(c, u), (c, {n: -t for n, t in u.items()})]
        return weighted_passes(model, micro, weights, loss_fn, scaler, terms)
