"""Random weight perturbation (RWP), Li et al. 2022."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from flatminima import noise as noise_lib
from flatminima._checks import check_nonneg, check_unit_interval
from flatminima.methods._base import NoiseFn, RandomPerturbation
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import Passes, StepResult, weighted_gradient
from flatminima.methods._registry import register_method


class RWPNoise:
    """The official RWP draw: ``u ~ N(0, (gamma * ||w_filter||)^2)`` for each filter of a tensor
    with ``dim > 1``, and ``u ~ N(0, (gamma * ||w||)^2)`` with the whole tensor's norm for a 1-D
    one (a bias, a norm scale), as ``train_rwp_parallel.py`` of nblt/RWP does."""

    def __init__(self, gamma: float) -> None:
        self.gamma = gamma

    def __call__(
        self, params: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for n, w in params.items():
            scale = "filter" if w.dim() > 1 else "layer"
            out.update(noise_lib.sample({n: w}, self.gamma, distribution="gaussian",
                                        scale=scale, relative=True, generator=generator))
        return out

    def __repr__(self) -> str:
        return f"RWPNoise(gamma={self.gamma})"


@register_method("rwp")
class RWP(RandomPerturbation):
    """``mix * grad L(w + u) + (1 - mix) * grad L(w)``, ``u ~ N(0, gamma^2 ||w_filter||^2)``.

    Li, Yan, He, Wu, Huang, "Efficient Generalization Improvement Guided by Random Weight
    Perturbation" (2022); official code nblt/RWP. Filter-wise Gaussian noise whose standard
    deviation is ``gamma`` times the filter's norm (a 1-D tensor's noise uses the whole tensor's
    norm, as the official code does: :class:`RWPNoise`), and a mixed loss of the clean and the
    perturbed gradient (``mix = 1`` is plain RWP, ``mix = 0.5`` the paper's mixed variant).

    One departure: the official parallel code computes the two gradients on two devices, each on
    its own batch; here both use the same batch (the clean gradient's batch), as a single-device
    gradient estimator must. Under DDP each rank still draws its own ``u``.

    Example::

        method = fm.RWP(gamma=0.01, mix=0.5)
    """

    gamma = hparam(0.01, check_nonneg,
                   "noise std relative to each filter's norm, >= 0 (paper: 0.01 on CIFAR).")
    mix = hparam(0.5, check_unit_interval, "weight of the perturbed gradient, in [0, 1].")

    def default_noise(self) -> NoiseFn:
        return RWPNoise(float(self.gamma))

    def _backward(self, step: Passes, generator) -> StepResult:
        u = self.draw(step, generator)
        mix = float(self.mix)
        return weighted_gradient(step, lambda mb: [(1 - mix, None), (mix, u)])
