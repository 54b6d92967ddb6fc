"""A new method in one file: RPR with Gaussian noise, registered for the library and the CLI.

    import examples.gaussian_rpr                    # or put the file in flatminima/methods/
    method = fm.create_method("gaussian_rpr", sigma=0.02)

The declaration below is all there is: the constructor, validation, ``hparams()``, ``repr``,
the state round trip and the command line's ``sigma=`` key come from it, and the pass primitive
gives the method every guarantee of the README (weights untouched, BatchNorm statistics updated
once, dropout masks replayed, micro-batches, GradScaler, DDP).
"""

from __future__ import annotations

import flatminima as fm
from flatminima._checks import check_nonneg
from flatminima.methods import RandomPerturbation, hparam, register_method, weighted_gradient


@register_method("gaussian_rpr")
class GaussianRPR(RandomPerturbation):
    """``grad L(w + u)`` with ``u ~ N(0, sigma^2 ||w_filter||^2)`` per filter, one draw per call.

    Example::

        method = GaussianRPR(sigma=0.02)
        method.backward(model, x, y); opt.step(); opt.zero_grad()
    """

    sigma = hparam(0.01, check_nonneg, "noise std relative to each filter's norm, >= 0.")

    def default_noise(self):
        return fm.noise.Sampler(self.sigma, "gaussian", "filter", relative=True)

    def _backward(self, step, generator):
        u = self.draw(step, generator)
        # The clean pass without a graph (c = 0) reports the loss and updates BatchNorm.
        return weighted_gradient(step, lambda mb: [(0.0, None), (1.0, u)])
