"""Momentum-SAM (MSAM), Becker, Altrock & Risse 2024: SAM's ascent replaced by the momentum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima._checks import check_bool, check_nonneg
from flatminima.methods._base import Method
from flatminima.methods._gradients import global_norm
from flatminima.methods._hparams import argument, hparam
from flatminima.methods._passes import Passes, StepResult, weighted_gradient
from flatminima.methods._registry import register_method

# Where the optimizers of torch.optim keep the momentum MSAM perturbs along, in the order tried:
# SGD (and RMSprop with momentum) keep ``v <- mu v + g`` as "momentum_buffer"; Adam, AdamW,
# NAdam, RAdam and Adamax keep ``m <- beta1 m + (1 - beta1) g`` as "exp_avg". The scale of the
# buffer does not matter: it is normalized to length rho.
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg")


def _check_optimizer(value: Any, name: str) -> Any:
    if value is None:
        return None
    if not hasattr(value, "state") or not hasattr(value, "param_groups"):
        raise ValueError(f"{name} must be a torch.optim.Optimizer (something with .state and "
                         f".param_groups), got {type(value).__name__}")
    return value


def _group_of(optimizer: Any, p: Tensor) -> Mapping[str, Any] | None:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


def _keeps_momentum(group: Mapping[str, Any]) -> bool:
    if "momentum" in group:
        return float(group["momentum"]) != 0.0
    if "betas" in group:
        return float(group["betas"][0]) != 0.0
    return False


def momentum_buffers(optimizer: Any, params: Mapping[str, nn.Parameter]) -> dict[str, Tensor]:
    """The optimizer's momentum of each of ``params``, read (never written), by name.

    A parameter without a buffer yet (before the optimizer's first step) is left out. A
    parameter the optimizer does not hold, or holds in a group that keeps no momentum (SGD with
    ``momentum=0``, an optimizer without momentum), is a ``ValueError`` naming it.
    """
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        state = optimizer.state.get(p, {})
        buf = next((state[k] for k in MOMENTUM_KEYS if state.get(k) is not None), None)
        if buf is not None:
            out[name] = buf.detach()
            continue
        group = _group_of(optimizer, p)
        if group is None:
            raise ValueError(f"parameter {name!r} is not in the optimizer's param_groups: MSAM "
                             "perturbs along the momentum of the optimizer that steps the model")
        if not _keeps_momentum(group):
            raise ValueError(
                f"optimizer {type(optimizer).__name__} keeps no momentum for parameter "
                f"{name!r} (SGD needs momentum > 0, Adam/AdamW betas[0] > 0): MSAM has no "
                "direction to perturb along")
    return out


@register_method("msam")
class MSAM(Method):
    """``grad L(w - rho * v / ||v||)``, ``v`` the optimizer's momentum (Becker et al. 2024).

    Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
    Overhead" (2024); official code https://github.com/MarlonBecker/MSAM
    (``optimizer/msam.py``, ``optimizer/adamW_msam.py``). SAM's ascent ``rho * g / ||g||``
    needs a first pass for ``g``; MSAM takes the direction from the momentum the optimizer
    already keeps, with the sign of the official code (``p.sub_(buf, alpha=rho / ||buf||)``)::

        e = -rho * v / ||v||        # one global norm over the perturbed parameters
        grad = grad L(w + e)

    With SGD, ``v`` is ``momentum_buffer`` (``v <- mu v + g``, weight decay included, as torch's
    SGD and the official code keep it); with Adam/AdamW it is ``exp_avg``. The buffers are those
    left by the previous ``optimizer.step()``, which is where the official code (that keeps the
    weights at ``w + e`` between steps) evaluates the gradient too. Before the optimizer's first
    step there is no buffer: the gradient is then plain ``grad L(w)`` (the official code starts
    from zero buffers, the same thing).

    **The optimizer is read, never driven.** MSAM stays a gradient estimator: it holds a
    reference to the optimizer given as ``optimizer=`` (an ``argument``: Python only, not part of
    the state) and reads ``optimizer.state[p]`` for each perturbed parameter, found by identity
    (so a DDP-wrapped model works); it never steps, zeroes or writes it. The optimizer usually
    exists only after the method (it needs the model's parameters, the method may not), so it
    can be given later: ``method.optimizer = opt`` before the first ``backward``;
    ``flatminima train`` does that for any method that declares an ``optimizer`` argument. A
    missing optimizer, a parameter it does not hold, or one it keeps no momentum for (SGD with
    ``momentum=0``) is a ``ValueError``. On resume, the momentum comes back with the optimizer's
    own ``load_state_dict``; MSAM keeps nothing of its own.

    **Cost.** By default (``clean_pass=True``) a forward pass at ``w`` without a graph gives the
    clean loss and updates the BatchNorm statistics, as every method here promises, and the one
    forward/backward runs at ``w + e``: RPR's cost, not SAM's. ``clean_pass=False`` is the paper's
    single pass: the statistics are updated by the pass at ``w + e`` (the official code's weights
    sit there), and the result's ``loss`` and ``logits`` are those at ``w + e`` (the official code
    logs those too). The official code recomputes the statistics at ``w`` after training; with
    ``clean_pass=False`` do the same (a forward epoch in train mode without gradients).

    One departure, from stepping with an unmodified torch optimizer: the official optimizer
    adds its weight decay at the weights it holds, ``w + e``; torch's SGD here adds it at ``w``.

    The official defaults are ``rho=3`` with SGD on CIFAR (``configs/*.ini``; its README also
    uses 3 for AdamW on ViT). ``rho`` is much larger than SAM's because ``v`` points along past
    descent, which the loss rises along only slowly.

    Example::

        method = fm.MSAM(rho=3.0)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        method.optimizer = opt
        for x, y in loader:
            method.backward(model, x, y); opt.step(); opt.zero_grad()
    """

    rho = hparam(3.0, check_nonneg,
                 "length of the step against the momentum, >= 0 (official: 3 on CIFAR).")
    clean_pass = hparam(True, check_bool,
                        "a forward at w without a graph for the clean loss and the statistics "
                        "(False: the paper's single pass, statistics and loss at w + e).",
                        positional=False)
    optimizer = argument(None, _check_optimizer,
                         "the torch.optim optimizer whose momentum is read (SGD momentum_buffer "
                         "or Adam(W) exp_avg); may be set after construction.")

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        if self.optimizer is None:
            raise ValueError("MSAM perturbs along the optimizer's momentum: pass optimizer= or "
                             "set method.optimizer = opt before the first backward")
        params = self.selected_params(step)
        buffers = momentum_buffers(self.optimizer, params)
        if not buffers:  # before the optimizer's first step: no direction yet
            return weighted_gradient(step, lambda mb: [(1.0, None)])
        scale = -float(self.rho) / (global_norm(buffers) + 1e-12)
        # New tensors: the optimizer's buffers are only read.
        e = {n: (buf * scale).to(params[n].dtype) for n, buf in buffers.items()}
        if self.clean_pass:
            return weighted_gradient(step, lambda mb: [(0.0, None), (1.0, e)])
        losses, outputs = [], []
        for mb in step:
            p = mb.forward(e, final=True, stats=True)
            mb.backward(p.loss)
            losses.append(p.loss.detach())
            outputs.append(p.outputs.detach())
        loss = step.mean(losses)
        return StepResult(loss, torch.cat(outputs) if len(outputs) > 1 else outputs[0], loss)
