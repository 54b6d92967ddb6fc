"""The neighbourhood RPR and NRS sample from: ``rho`` and the default sampler's three choices."""

from __future__ import annotations

from flatminima import noise as noise_lib
from flatminima._checks import check_bool, check_choice, check_nonneg
from flatminima.methods._base import NoiseFn, RandomPerturbation
from flatminima.methods._hparams import hparam


class Neighbourhood(RandomPerturbation):
    """``u`` uniform in a ball per filter of radius ``rho * ||w_filter||`` by default.

    ``fm.noise.Sampler(rho, distribution, scale, relative)`` draws it, rebuilt on every call from
    the attributes so that ``rho`` can be scheduled; ``noise=`` replaces it.
    """

    rho = hparam(0.05, check_nonneg,
                 "neighbourhood radius (relative to the weights by default), >= 0.")
    distribution = hparam("ball",
                          lambda v, n: check_choice(v, noise_lib.DISTRIBUTIONS,
                                                    "noise distribution"),
                          "the default sampler's distribution (fm.noise).", positional=False)
    scale = hparam("filter",
                   lambda v, n: check_choice(v, noise_lib.SCALES, "noise scale"),
                   "the default sampler's scale rule (fm.noise).", positional=False)
    relative = hparam(True, check_bool,
                      "radius relative to each group's weight norm (False: absolute).",
                      positional=False)

    def default_noise(self) -> NoiseFn:
        return noise_lib.Sampler(self.rho, self.distribution, self.scale, self.relative)
