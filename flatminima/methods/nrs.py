"""Neighborhood Region Smoothing (NRS), Zhao & Zhang 2022.

Objective (paper Eq. 3), for a random ``u`` in the neighbourhood of radius ``rho``::

    L_NRS(w) = L(w) + alpha * KL(f_w(x) || f_{w+u}(x)) + L(w + u)

with ``f`` the predicted class distribution (softmax of the outputs). ``u`` is a constant of the
step; the gradient flows through both branches, ``f_w`` and ``f_{w+u}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from flatminima.divergence import kl_divergence
from flatminima.methods._base import (
    Method,
    RngReplay,
    StepResult,
    check_nonneg,
    forward_at,
    frozen_norm_stats,
    model_device,
    run_backward,
    sync_context,
    weighted_sum,
)
from flatminima.methods.rpr import RandomPerturbationMixin


class NRS(RandomPerturbationMixin, Method):
    """Neighborhood Region Smoothing: ``grad [L(w) + alpha*KL(f_w || f_{w+u}) + L(w+u)]``.

    Zhao & Zhang, "Neighborhood Region Smoothing Regularization for Finding Flat Minima in Deep
    Neural Networks", 2022. One ``u`` per call (per device under DDP: the paper's practical scheme),
    shared by all micro-batches.

    The paper samples ``u`` in the ball ``B(0, rho)`` and then "normalizes u using w" (Algorithm 1,
    step 8), without a formula in the text we have. Our default reads that as: ``u`` uniform in a
    ball per filter whose radius is ``rho * ||w_filter||`` (``distribution="ball", scale="filter",
    relative=True``), which is invariant to the per-filter rescaling that BatchNorm makes free and
    matches the filter-wise normalization of the flatness literature (Li et al. 2018; Kwon et al.
    2021).
    ``scale="global"`` gives a single ball of radius ``rho * ||w||``, ``relative=False`` the literal
    ``B(0, rho)``. Note that the objective sums two cross-entropies, so at equal learning rate its
    gradient is about twice Baseline's; compare at tuned learning rates (DESIGN, "Fair
    comparison").

    Args:
        rho: neighbourhood radius, ``>= 0`` (paper's ImageNet setting 0.1).
        alpha: weight of the model divergence, ``>= 0`` (paper: 1.0).
        low_memory: never hold two autograd graphs at once. The KL gradient splits exactly into a
            part through ``f_w`` (with ``f_{w+u}`` held constant) and a part through ``f_{w+u}``, so
            the two branches are backpropagated one after the other; one extra forward pass
            (no graph) provides the perturbed outputs the first branch needs. Same gradient.
        noise, distribution, scale, relative, params, share_noise: as in ``RPR``.

    Example::

        method = fm.NRS(rho=0.05, alpha=1.0)
        result = method.backward(model, x, y)   # result.divergence is the KL term
        opt.step(); opt.zero_grad(set_to_none=True)
    """

    name = "nrs"
    _hparam_names = ("rho", "alpha", "distribution", "scale", "relative", "low_memory")

    def __init__(
        self,
        rho: float = 0.05,
        alpha: float = 1.0,
        *,
        low_memory: bool = False,
        noise: Callable[..., dict[str, Tensor]] | None = None,
        distribution: str = "ball",
        scale: str = "filter",
        relative: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._init_noise(rho, noise, distribution, scale, relative)
        self.alpha = alpha
        self.low_memory = bool(low_memory)
        self._validate()

    def _validate(self) -> None:
        self._validate_noise()
        check_nonneg(self.alpha, "alpha")

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        params = self._perturbed_params(model)
        u = self._draw(self._noise_fn(), params, generator)
        device = model_device(model)
        alpha = float(self.alpha)
        clean, pert, div, logits = [], [], [], []
        last = len(micro) - 1
        for m, ((x, y), w_m) in enumerate(zip(micro, weights, strict=True)):
            rng = RngReplay(device)
            if self.low_memory:
                z1, l1, l2, kl = self._two_graphs_in_turn(model, x, y, u, w_m, alpha, loss_fn,
                                                          scaler, rng, m == last)
            else:
                z1, l1, l2, kl = self._one_graph(model, x, y, u, w_m, alpha, loss_fn, scaler, rng,
                                                 m == last)
            clean.append(l1)
            pert.append(l2)
            div.append(kl)
            logits.append(z1)
        out = torch.cat(logits) if len(logits) > 1 else logits[0]
        mean = weighted_sum
        return StepResult(mean(clean, weights), out, mean(pert, weights), mean(div, weights))

    @staticmethod
    def _one_graph(model, x, y, u, w_m, alpha, loss_fn, scaler, rng, last):
        # The clean forward runs outside DDP's reducer bookkeeping; the perturbed one (the last
        # forward before the single backward) arms it, so the summed gradient is reduced once.
        with sync_context(model, False):
            z1 = forward_at(model, x, None)
        rng.restore()
        with sync_context(model, last), frozen_norm_stats(model):
            z2 = forward_at(model, x, u)
        l1, l2, kl = loss_fn(z1, y), loss_fn(z2, y), kl_divergence(z1, z2)
        run_backward((l1 + alpha * kl + l2) * w_m, scaler)
        return z1.detach(), l1.detach(), l2.detach(), kl.detach()

    @staticmethod
    def _two_graphs_in_turn(model, x, y, u, w_m, alpha, loss_fn, scaler, rng, last):
        # 1. perturbed outputs without a graph: the constant the clean branch's KL gradient needs.
        with torch.no_grad(), frozen_norm_stats(model):
            z2_const = forward_at(model, x, u)
        # 2. clean branch: L(w) + alpha * KL(f_w || const), backward, graph freed.
        rng.restore()
        with sync_context(model, False):
            z1 = forward_at(model, x, None)
            l1 = loss_fn(z1, y)
            kl = kl_divergence(z1, z2_const)
            run_backward((l1 + alpha * kl) * w_m, scaler)
        z1 = z1.detach()
        # 3. perturbed branch: alpha * KL(const || f_{w+u}) + L(w+u), backward.
        rng.restore()
        with sync_context(model, last), frozen_norm_stats(model):
            z2 = forward_at(model, x, u)
            l2 = loss_fn(z2, y)
            run_backward((alpha * kl_divergence(z1, z2) + l2) * w_m, scaler)
        return z1, l1.detach(), l2.detach(), kl.detach()

