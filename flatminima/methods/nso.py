"""Noise stability optimization (NSO), Ju et al. 2023."""

from __future__ import annotations

from flatminima import noise as noise_lib
from flatminima._checks import check_nonneg, check_positive_int, check_unit_interval
from flatminima.methods._base import NoiseFn, RandomPerturbation
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import Passes, StepResult, weighted_gradient
from flatminima.methods._registry import register_method


@register_method("nso")
class NSO(RandomPerturbation):
    """``lam * grad L(w) + (1 - lam)/(2k) * sum_i [grad L(w + u_i) + grad L(w - u_i)]``.

    Ju, Li, Zhang, "Noise Stability Optimization for Flat Minima with Tight Rates" (2023). The
    two-sided samples ``u_i ~ N(0, sigma^2 I)`` cancel the first-order term of the noise, leaving
    a penalty on the Hessian trace ``sigma^2/2 * tr(H)``. As in the authors' code the noise is
    absolute (the same ``sigma`` for every parameter), all samples use the same batch, and the
    clean pass (without a graph when ``lam = 0``) updates the BatchNorm statistics.
    Micro-batches share the ``k`` draws.

    Example::

        method = fm.NSO(sigma=0.01, num_samples=1)
    """

    sigma = hparam(0.01, check_nonneg,
                   "standard deviation of the weight noise, >= 0 (authors' scripts: 0.01).")
    num_samples = hparam(1, check_positive_int, "number k of two-sided samples, >= 1.")
    lam = hparam(0.0, check_unit_interval,
                 "weight of the clean gradient, in [0, 1] (authors' scripts: 0).")

    def default_noise(self) -> NoiseFn:
        return noise_lib.Sampler(self.sigma, "gaussian", "element", relative=False)

    def _backward(self, step: Passes, generator) -> StepResult:
        k = self.num_samples
        c = (1.0 - float(self.lam)) / (2 * k)
        terms = [(float(self.lam), None)]
        for _ in range(k):
            u = self.draw(step, generator)
            terms += [(c, u), (c, {n: -t for n, t in u.items()})]
        return weighted_gradient(step, lambda mb: terms)
