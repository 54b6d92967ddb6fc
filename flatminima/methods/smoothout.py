"""SmoothOut and AdaSmoothOut (Wen et al. 2018): gradients at uniformly perturbed weights."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from flatminima import noise as noise_lib
from flatminima.methods._base import Method, StepResult, check_nonneg, weighted_passes


class SmoothOut(Method):
    """``grad L(w + u)``, ``u ~ U(-a, a)`` per entry, the weights de-noised before the update.

    Wen, Wang, Yan, Xu, Chen, Li, "SmoothOut: Smoothing Out Sharp Minima to Improve Generalization
    in Deep Learning" (2018), the unbiased stochastic variant: one noisy copy per batch, gradient
    taken there, the update applied to the clean weights (here the weights are never moved, which is
    the de-noising). With micro-batches (the authors' ghost batches) each draws fresh noise, as in
    the authors' code. Normalization-layer parameters are not perturbed by default (``params=
    "no_norm"``), also as there.

    Args:
        a: half-width of the uniform noise, ``>= 0``.
        noise: optional sampler ``(params, generator) -> dict`` (overrides ``a``).
        params: which parameters are perturbed (default ``"no_norm"``).
    """

    name = "smoothout"
    _hparam_names = ("a",)

    def __init__(
        self,
        a: float = 0.01,
        *,
        noise: Callable[..., dict[str, Tensor]] | None = None,
        params: Any = "no_norm",
        **kw: Any,
    ) -> None:
        super().__init__(params=params, **kw)
        self.a, self.noise = a, noise
        self._validate()

    def _validate(self) -> None:
        check_nonneg(self.a, "a")
        if self.noise is not None and not callable(self.noise):
            raise ValueError(f"noise must be callable, got {self.noise!r}")

    def _sample(
        self, params: Mapping[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        return noise_lib.sample(
            params, self.a, distribution="uniform", scale="element", relative=False,
            generator=generator,
        )

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        params = self._perturbed_params(model)
        sampler = self.noise or self._sample
        plan = [[(0.0, None), (1.0, self._draw(sampler, params, generator))] for _ in micro]
        return weighted_passes(model, micro, weights, loss_fn, scaler, plan, per_micro_batch=True)


class AdaSmoothOut(SmoothOut):
    """SmoothOut with noise adapted to each filter's norm (Wen et al. 2018, AdaSmoothOut).

    For filter ``i`` a uniform draw ``U(-1, 1)`` is normalized to unit length and multiplied by
    ``a * ||w_i||``, as in the authors' code; 1-D tensors count each entry as a filter.

    Args:
        a: noise norm relative to the filter norm, ``>= 0``.
    """

    name = "adasmoothout"

    def _sample(
        self, params: Mapping[str, Tensor], generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        out = {}
        for n, w in params.items():
            rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(-1, 1)
            xi = noise_lib.sample({n: rows}, 1.0, distribution="uniform", scale="element",
                                  relative=False, generator=generator)[n]
            xi = xi / xi.norm(dim=1, keepdim=True).clamp_min(torch.finfo(xi.dtype).tiny)
            out[n] = (xi * rows.norm(dim=1, keepdim=True) * float(self.a)).reshape(w.shape)
        return out
