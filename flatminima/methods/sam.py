"""Sharpness-aware minimization: SAM (Foret et al. 2021) and ASAM (Kwon et al. 2021)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flatminima._checks import check_nonneg
from flatminima.methods._base import Method, poison_grads
from flatminima.methods._hparams import hparam
from flatminima.methods._passes import Passes, StepResult
from flatminima.methods._registry import register_method


@register_method("sam")
class SAM(Method):
    """``grad L(w + e)``, ``e = rho * g / ||g||``, ``g = grad L(w)`` (Foret et al., ICLR 2021).

    The ascent direction ``g`` comes from the full batch (all micro-batches), unscaled when a
    ``GradScaler`` is used; the second pass at ``w + e`` accumulates into ``p.grad``. The first
    pass updates the BatchNorm statistics, the second does not. Parameters outside ``params``
    are not perturbed but still receive their gradient at ``w + e``. A non-finite ascent
    (float16 overflow) makes ``scaler.step`` skip the step.

    Example::

        method = fm.SAM(rho=0.05)
        method.backward(model, x, y); opt.step(); opt.zero_grad()
    """

    rho = hparam(0.05, check_nonneg, "ascent radius, >= 0 (paper: 0.05 on CIFAR).")

    def _ascent(
        self, params: dict[str, nn.Parameter], grads: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
        scale = float(self.rho) / (float(norm) + 1e-12)
        return {n: g * scale for n, g in grads.items()}

    def _backward(self, step: Passes, generator) -> StepResult:
        params = self.selected_params(step)
        names, tensors = list(params), list(params.values())
        grads = {n: torch.zeros_like(p) for n, p in params.items()}
        # Sweep 1: the full-batch gradient at w, read back without touching p.grad.
        for mb in step:
            clean = mb.forward()
            for n, g in zip(names, mb.gradient(clean.loss, tensors), strict=True):
                if g is not None:
                    grads[n] += g
        overflow = not all(bool(torch.isfinite(g).all()) for g in grads.values())
        # A non-finite ascent: skip the step (below) rather than step on garbage; the second
        # sweep still runs (at w) so that DDP reduces and every rank agrees on the skip.
        e = ({n: torch.zeros_like(g) for n, g in grads.items()} if overflow
             else self._ascent(params, grads))
        del grads
        # Sweep 2: accumulate grad L(w + e), dropout masks replayed from sweep 1.
        for mb in step:
            mb.backward(mb.forward(e, final=True).loss)
        if overflow:
            poison_grads(tensors)
        return step.result()


@register_method("asam")
class ASAM(SAM):
    """Adaptive SAM: ``e = rho * T_w^2 g / ||T_w g||``, ``T_w = |w| + eta`` (Kwon et al. 2021).

    As in the authors' code, the operator ``T_w`` acts on parameters whose name contains
    ``"weight"`` (so biases are excluded, normalization scales included); every other parameter
    has ``T = 1``. ASAM's ``rho`` is about 10x SAM's (paper: 0.5 with SGD on CIFAR-10).

    Example::

        method = fm.ASAM(rho=0.5, eta=0.01)
    """

    rho = hparam(0.5, check_nonneg, "ascent radius in the rescaled space, >= 0.")
    eta = hparam(0.01, check_nonneg, "keeps T_w away from zero, >= 0 (paper: 0.01).")

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
