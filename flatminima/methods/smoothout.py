"""SmoothOut and AdaSmoothOut (Wen et al. 2018): gradients at uniformly perturbed weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flatminima import noise as noise_lib
from flatminima._checks import check_nonneg
from flatminima._nn import filter_rows
from flatminima._params import freeze_selection
from flatminima.methods._base import NoiseFn, RandomPerturbation, _check_selection
from flatminima.methods._hparams import argument, hparam
from flatminima.methods._passes import Passes, StepResult, weighted_gradient
from flatminima.methods._registry import register_method


@register_method("smoothout")
class SmoothOut(RandomPerturbation):
    """``grad L(w + u)``, ``u ~ U(-a, a)`` per entry, the weights de-noised before the update.

    Wen, Wang, Yan, Xu, Chen, Li, "SmoothOut: Smoothing Out Sharp Minima to Improve
    Generalization in Deep Learning" (2018), the unbiased stochastic variant: one noisy copy per
    batch, gradient taken there, the update applied to the clean weights (here the weights are
    never moved, which is the de-noising). Unlike the other random methods, each micro-batch (the
    authors' ghost batch) draws fresh noise, as in the authors' code. Normalization-layer
    parameters are not perturbed by default (``params="no_norm"``), also as there.

    Example::

        method = fm.SmoothOut(a=0.01)
    """

    a = hparam(0.01, check_nonneg, "half-width of the uniform noise, >= 0.")
    params = argument("no_norm", _check_selection,
                      "which parameters are perturbed (default: all but normalization layers).",
                      convert=freeze_selection)

    def default_noise(self) -> NoiseFn:
        return noise_lib.Sampler(self.a, "uniform", "element", relative=False)

    def _backward(self, step: Passes, generator) -> StepResult:
        draws = [self.draw(step, generator) for _ in step]
        return weighted_gradient(step, lambda mb: [(0.0, None), (1.0, draws[mb.index])])


class AdaSmoothOutNoise:
    """AdaSmoothOut's draw: for filter ``i`` a ``U(-1, 1)`` vector scaled to unit length, times
    ``a * ||w_i||`` (the authors' code); a 1-D tensor counts each entry as a filter."""

    def __init__(self, a: float) -> None:
        self.a = a

    def __call__(
        self, params: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        out = {}
        for n, w in params.items():
            rows = filter_rows(w)
            xi = noise_lib.sample({n: rows}, 1.0, distribution="uniform", scale="element",
                                  relative=False, generator=generator)[n]
            xi = xi / xi.norm(dim=1, keepdim=True).clamp_min(torch.finfo(xi.dtype).tiny)
            out[n] = (xi * rows.norm(dim=1, keepdim=True) * float(self.a)).reshape(w.shape)
        return out

    def __repr__(self) -> str:
        return f"AdaSmoothOutNoise(a={self.a})"


@register_method("adasmoothout")
class AdaSmoothOut(SmoothOut):
    """SmoothOut with noise adapted to each filter's norm (Wen et al. 2018, AdaSmoothOut).

    Example::

        method = fm.AdaSmoothOut(a=0.01)
    """

    a = hparam(0.01, check_nonneg, "noise norm relative to each filter's norm, >= 0.")

    def default_noise(self) -> NoiseFn:
        return AdaSmoothOutNoise(float(self.a))
