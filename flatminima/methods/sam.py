"""Sharpness-aware minimization: SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from flatminima.methods._base import (
    Method,
    RngReplay,
    StepResult,
    check_nonneg,
    forward_at,
    frozen_norm_stats,
    model_device,
    poison_grads,
    run_backward,
    sync_context,
    weighted_sum,
)


class SAM(Method):
    """``grad L(w + e)``, ``e = rho * g / ||g||``, ``g = grad L(w)`` (Foret et al., ICLR 2021).

    The ascent direction ``g`` comes from the full batch (all micro-batches), unscaled when a
    ``GradScaler`` is used; the second pass at ``w + e`` accumulates into ``p.grad``. The first pass
    updates the BatchNorm statistics, the second does not. Parameters outside ``params`` are not
    perturbed but still receive their gradient at ``w + e``.

    Args:
        rho: ascent radius, ``>= 0`` (paper: 0.05 on CIFAR).
        params: which parameters are perturbed (``None``: all trainable).
    """

    name = "sam"
    _hparam_names: tuple[str, ...] = ("rho",)

    def __init__(self, rho: float = 0.05, **kw: Any) -> None:
        super().__init__(**kw)
        self.rho = rho
        self._validate()

    def _validate(self) -> None:
        check_nonneg(self.rho, "rho")

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        scale = float(self.rho) / (float(norm) + 1e-12)
        return {n: g * scale for n, g in grads.items()}

    def _backward(self, model, micro, weights, loss_fn, scaler, generator) -> StepResult:
        params = self._perturbed_params(model)
        names, tensors = list(params), list(params.values())
        device = model_device(model)
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        clean, logits, replays = [], [], []
        inv_scale = 1.0 / float(scaler.get_scale()) if scaler is not None else 1.0
        # Pass 1: the full-batch gradient at w, read back without touching p.grad.
        for (x, y), w_m in zip(micro, weights, strict=True):
            replays.append(RngReplay(device))
            with sync_context(model, False):
                out = forward_at(model, x, None)
                loss = loss_fn(out, y)
                scaled = loss * w_m if scaler is None else scaler.scale(loss * w_m)
                gs = torch.autograd.grad(scaled, tensors, allow_unused=True)
            for n, g in zip(names, gs, strict=True):
                if g is not None:
                    grads[n] += g * inv_scale
            clean.append(loss.detach())
            logits.append(out.detach())
        overflow = not all(bool(torch.isfinite(g).all()) for g in grads.values())
        if overflow:
            e = None  # a non-finite ascent: skip the step (below) rather than step on garbage
        else:
            e = self._ascent(params, grads)
        del grads
        # Pass 2: accumulate grad L(w + e).
        pert = []
        last = len(micro) - 1
        for m, ((x, y), w_m) in enumerate(zip(micro, weights, strict=True)):
            replays[m].restore()
            with sync_context(model, m == last), frozen_norm_stats(model):
                loss = loss_fn(forward_at(model, x, e), y)
                run_backward(loss * w_m, scaler)
            pert.append(loss.detach())
        if overflow:
            poison_grads(tensors)
        out = torch.cat(logits) if len(logits) > 1 else logits[0]
        return StepResult(weighted_sum(clean, weights), out, weighted_sum(pert, weights))


class ASAM(SAM):
    """Adaptive SAM: ``e = rho * T_w^2 g / ||T_w g||``, ``T_w = |w| + eta`` (Kwon et al. 2021).

    As in the authors' code, the operator ``T_w`` acts on parameters whose name contains
    ``"weight"`` (so biases are excluded, normalization scales included); every other parameter has
    ``T = 1``. ASAM's ``rho`` is about 10x SAM's (paper: 0.5 with SGD on CIFAR-10).

    Args:
        rho: ascent radius in the rescaled space, ``>= 0``.
        eta: keeps ``T_w`` away from zero, ``>= 0`` (paper: 0.01).
    """

    name = "asam"
    _hparam_names = ("rho", "eta")

    def __init__(self, rho: float = 0.5, eta: float = 0.01, **kw: Any) -> None:
        self.eta = eta
        super().__init__(rho, **kw)

    def _validate(self) -> None:
        super()._validate()
        check_nonneg(self.eta, "eta")

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        t = {
            n: (p.detach().abs() + float(self.eta)) if "weight" in n else None
            for n, p in params.items()
        }
        tg = {n: g * t[n] if t[n] is not None else g for n, g in grads.items()}
        norm = torch.sqrt(sum((v.double() ** 2).sum() for v in tg.values()))
        scale = float(self.rho) / (float(norm) + 1e-12)
        return {n: (v * t[n] if t[n] is not None else v) * scale for n, v in tg.items()}
