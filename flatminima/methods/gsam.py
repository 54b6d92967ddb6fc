"""Surrogate-gap guided SAM (GSAM), Zhuang et al. 2022."""

from __future__ import annotations

import math

import torch
from torch import nn

from flatminima._checks import check_nonneg
from flatminima._params import select_params
from flatminima.methods._gradients import dot, global_norm
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import MicroBatch, Passes
from flatminima.methods._registry import register_method
from flatminima.methods.sam import SAM, Grads, add_to_grad


@register_method("gsam")
class GSAM(SAM):
    """``g_p - alpha * g_perp``: SAM's gradient minus the part of the clean one orthogonal to it.

    Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu, "Surrogate Gap Guided
    Sharpness-Aware Minimization" (ICLR 2022); official PyTorch code
    https://github.com/juntang-zhuang/GSAM (``gsam/gsam.py``). With ``g = grad L(w)``,
    ``e = rho * g / ||g||`` (SAM's ascent) and ``g_p = grad L(w + e)``::

        g_perp = g - (<g, g_p> / ||g_p||^2) * g_p        # the component of g orthogonal to g_p
        grad   = g_p - alpha * g_perp

    Descending ``g_p`` minimizes the perturbed loss; ascending ``g_perp`` lowers the surrogate
    gap ``L(w + e) - L(w)`` without changing ``L(w + e)`` to first order. ``alpha = 0`` is SAM.

    As in the official code, the decomposition runs over every trainable parameter (the ascent
    over ``params`` only), with each DDP rank's own ``g`` and ``g_p``; the ranks' results are then
    averaged once. The official code decays ``rho`` with the learning rate (``rho_t`` between
    ``rho_min`` and ``rho_max``); here ``rho`` is an attribute a schedule may set between steps
    (``method.rho = ...``). Cost: SAM's two passes. Under DDP the last perturbed pass keeps its
    graph until the coefficient of ``g_p``, ``1 + alpha * <g, g_p> / ||g_p||^2``, is known, and
    runs one more backward scaled by it (the one DDP reduces in); without DDP the sum is written
    into ``p.grad`` directly.

    Example::

        method = fm.create_method("gsam", rho=0.05, alpha=0.4)
    """

    alpha = hparam(0.4, check_nonneg,
                   "weight of the ascent along g_perp, >= 0 (official code's default: 0.4).")

    def _gradient_params(
        self, step: Passes, params: dict[str, nn.Parameter]
    ) -> dict[str, nn.Parameter]:
        return select_params(step.model)

    def _descend(
        self, unit: list[MicroBatch], e: Grads, g: Grads, weight: float,
        params: dict[str, nn.Parameter],
    ) -> bool:
        # grad = a * g_p - alpha * g with a = 1 + alpha * <g, g_p> / ||g_p||^2, known only when
        # the unit's last perturbed gradient is: read it with the graph kept, write the rest of
        # the sum into p.grad, then backward that last pass scaled by a (DDP reduces there).
        names, tensors = list(params), list(params.values())
        gp = {n: torch.zeros_like(p) for n, p in params.items()}  # sum of weighted g_p so far
        last = unit[-1]
        for mb in unit[:-1]:
            for n, t in zip(names, mb.gradient(mb.forward(e, final=True).loss, tensors),
                            strict=True):
                if t is not None:
                    gp[n] += t
        rest = {n: t.clone() for n, t in gp.items()}
        out = last.forward(e, final=True)
        ddp = last.step.ddp  # only DDP needs the last pass's own backward (it reduces there)
        for n, t in zip(names, last.gradient(out.loss, tensors, retain_graph=ddp), strict=True):
            if t is not None:
                gp[n] += t
        # The unit's mean g_p (a group's weighted sum divided by its weight), as g is.
        inner = dot(g, gp) / weight
        sq = global_norm(gp) ** 2 / weight**2
        alpha = float(self.alpha)
        a = 1.0 + alpha * inner / (sq + 1e-12)
        if not ddp:  # the whole sum is known: written at once, no second backward
            add_to_grad(last.step, params, {n: a * gp[n] - alpha * weight * g[n] for n in names})
            return math.isfinite(a)
        add_to_grad(last.step, params, {n: a * rest[n] - alpha * weight * g[n] for n in names})
        last.backward(out.loss * a)
        return math.isfinite(a)
