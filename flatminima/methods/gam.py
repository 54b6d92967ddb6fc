"""Gradient norm aware minimization (GAM), Zhang et al., CVPR 2023: its first-order version."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from flatminima._checks import check_nonneg, check_unit_interval
from flatminima._params import select_params
from flatminima.methods._base import Method, poison_grads
from flatminima.methods._gradients import all_finite, dot, global_norm
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import Passes, StepResult
from flatminima.methods._registry import register_method
from flatminima.methods.sam import add_to_grad, clean_gradient

Grads = dict[str, Tensor]


def _toward(params: Mapping[str, nn.Parameter], d: Grads, radius: float,
            base: Grads | None = None) -> Grads:
    """``base + radius * d / ||d||`` over the perturbed ``params`` (norm over them)."""
    part = {n: d[n] for n in params}
    scale = radius / (global_norm(part) + 1e-12)
    return {n: (base[n] if base is not None else 0) + t * scale for n, t in part.items()}


def _gradient_at(step: Passes, e: Grads, reads: Mapping[str, nn.Parameter],
                 loss_weight: float) -> Grads:
    """``grad L(w + e)`` of ``reads`` over the whole batch, read back (``p.grad`` untouched)."""
    names, tensors = list(reads), list(reads.values())
    out = {n: torch.zeros_like(p) for n, p in reads.items()}
    for mb in step:
        p = mb.forward(e, loss_weight=loss_weight)
        for n, g in zip(names, mb.gradient(p.loss, tensors), strict=True):
            if g is not None:
                out[n] += g
    return out


@register_method("gam")
class GAM(Method):
    """First-order GAM: SAM's gradient steered by the gradient norm's ascent (Zhang et al. 2023).

    Zhang, Xu, Yu, Zou, Cui, "Gradient Norm Aware Minimization Seeks First-Order Flatness and
    Improves Generalization" (CVPR 2023); official code https://github.com/xxgege/GAM
    (``gam/gam.py``). The paper's GAM needs Hessian-vector products; the official code releases
    the accelerated version of its Appendix D, in which ``grad ||grad L||`` is a finite
    difference of gradients, and so is this one. With ``u/||u||`` written ``hat(u)``::

        g0 = grad L(w)
        g1 = grad L(w + rho' hat(g0))                   # SAM's perturbed gradient
        e  = rho hat(g1 - g0)                           # ascent of the gradient norm
        g2 = grad L(w + e)
        g3 = grad L(w + e + rho' hat(g2))
        m  = g0 + (1 - beta) g2                         # official "pro_m"
        h  = alpha g1 + (1 - alpha) g3
        grad = h - gamma * (m - (<m, h> / ||h||^2) h)   # minus gamma times m's part orthogonal to h

    (the official ``gradient_decompose``: ``vertical = m - cos(m, h) ||m|| h/||h||``). Names as
    in the official README: ``rho`` is ``rho_t`` (``grad_norm_rho``), ``rho_prime`` is ``rho'_t``
    (``grad_rho``), ``alpha`` is ``grad_beta_1``, ``beta`` is ``grad_beta_0``, ``gamma`` is
    ``grad_gamma``; the defaults are ``main_cifar.py``'s for ResNets on CIFAR-10 (CIFAR-100:
    ``rho_prime=0.02, alpha=0.6, beta=0.5, gamma=0.03``). The official code decays ``rho`` and
    ``rho_prime`` with the learning rate; here they are attributes a schedule may set.

    The perturbations move the parameters ``params`` selects (norms over them); the gradients
    and the decomposition run over every trainable parameter, each DDP rank with its own
    gradients, the result averaged once (as the official code's final all-reduce).
    Cost: four forward and five backward passes (the last pass's backward runs twice: once to
    read ``g3``, on which the coefficient of ``h`` depends, once scaled by it into ``p.grad``).
    The result's ``perturbed_loss`` is the loss at ``w + rho' hat(g0)`` (SAM's point).

    Example::

        method = fm.GAM(rho=0.2, rho_prime=0.03, alpha=0.1, beta=0.1, gamma=0.05)
    """

    rho = hparam(0.2, check_nonneg,
                 "radius of the gradient-norm ascent rho_t, >= 0 (official: 0.2).")
    rho_prime = hparam(0.03, check_nonneg,
                       "radius of the SAM-like ascents rho'_t, >= 0 (official CIFAR-10: 0.03).")
    alpha = hparam(0.1, check_unit_interval, "weight of g1 against g3 in h, in [0, 1].")
    beta = hparam(0.1, check_unit_interval, "m = g0 + (1 - beta) g2, beta in [0, 1].")
    gamma = hparam(0.05, check_nonneg, "weight of the orthogonal correction, >= 0.")

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        params = self.selected_params(step)
        reads = select_params(step.model)
        rho, rho_p = float(self.rho), float(self.rho_prime)
        g0 = clean_gradient(list(step), reads)
        finite = all_finite(g0)
        if finite:
            g1 = _gradient_at(step, _toward(params, g0, rho_p), reads, 1.0)
            e = _toward(params, {n: g1[n] - g0[n] for n in params}, rho)
            g2 = _gradient_at(step, e, reads, 0.0)
            finite = all_finite(g1) and all_finite(g2)
        if not finite:  # the last pass still runs (DDP reduces there); the step is skipped
            zero = {n: torch.zeros_like(p) for n, p in params.items()}
            for mb in step:
                mb.backward(mb.forward(zero, final=True, loss_weight=0.0).loss)
            poison_grads(list(reads.values()))
            return step.result()
        e3 = _toward(params, g2, rho_p, base=e)
        alpha, beta, gamma = float(self.alpha), float(self.beta), float(self.gamma)
        m = {n: g0[n] + (1 - beta) * g2[n] for n in reads}
        del g0, g2
        # g3 of all but the last micro-batch is read back; the last one's with its graph kept,
        # so that its backward, scaled by the coefficient a of h, lands in p.grad last (the
        # backward DDP reduces on, with everything written before it).
        names, tensors = list(reads), list(reads.values())
        *rest, last = list(step)
        g3_rest = {n: torch.zeros_like(p) for n, p in reads.items()}
        for mb in rest:
            p = mb.forward(e3, loss_weight=0.0)
            for n, g in zip(names, mb.gradient(p.loss, tensors), strict=True):
                if g is not None:
                    g3_rest[n] += g
        p_last = last.forward(e3, final=True, loss_weight=0.0)
        g3_last = last.gradient(p_last.loss, tensors, retain_graph=True)
        h = {n: alpha * g1[n] + (1 - alpha) * (g3_rest[n] + g if g is not None else g3_rest[n])
             for n, g in zip(names, g3_last, strict=True)}
        if not all_finite(h):
            last.backward(p_last.loss * 0.0)
            poison_grads(tensors)
            return step.result()
        a = 1.0 + gamma * dot(m, h) / (global_norm(h) ** 2 + 1e-12)
        # grad = a h - gamma m: everything but a (1 - alpha) g3 of the last micro-batch is
        # written into p.grad here, that last term by the backward below.
        add_to_grad(step, reads, {n: a * alpha * g1[n] + a * (1 - alpha) * g3_rest[n]
                                  - gamma * m[n] for n in reads})
        last.backward(p_last.loss * (a * (1 - alpha)))
        return step.result()
