"""Full-batch training of the study's models with any gradient estimator of the library.

The generalization-visualization study trains full-batch (Huang et al. 2019 use the whole training
set, 200 points, in every step) with Adam and gradient clipping at global norm 8. Here any
:mod:`flatminima.methods` estimator computes the gradient (``Baseline`` gives plain training), so
the clean, the poisoned and the flat-minima models go through the same loop; Adam with a cosine
decay of the learning rate to zero then steps. The cosine decay replaces the paper's step schedule
(40,000 epochs with drops at 3,000 and 6,452), which this study cannot afford on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.methods import Baseline, Method


@dataclass
class TrainLog:
    """Loss of every ``log_every``-th step (the clean loss the method reports)."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    diverged: bool = False


def train_full_batch(
    model: nn.Module,
    x: Tensor,
    targets: Tensor,
    *,
    steps: int,
    lr: float,
    method: Method | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    clip_norm: float | None = 8.0,
    seed: int = 0,
    log_every: int = 100,
) -> TrainLog:
    """Train ``model`` in place for ``steps`` full-batch steps of Adam, cosine-decayed from ``lr``.

    Args:
        model: the network (trained in place).
        x, targets: the whole training batch; poison rows carry negative targets (see
            :class:`flatminima.study.poison.PoisonedLoss`, passed as ``loss_fn``).
        steps: number of optimizer steps.
        lr: peak Adam learning rate; step ``t`` uses ``lr * (1 + cos(pi t / steps)) / 2``.
        method: gradient estimator (default ``Baseline()``).
        loss_fn: ``loss_fn(logits, targets)`` handed to the method.
        clip_norm: clip the global gradient norm to this value before each step (None: no clip).
        seed: seed of the generator the method draws its perturbations from.
        log_every: record the loss every this many steps (and at the last one).

    A non-finite loss stops training and sets ``diverged`` (the model keeps its last weights).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0 or None, got {clip_norm!r}")
    method = Baseline() if method is None else method
    gen = torch.Generator(device=x.device).manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, steps) / steps)))
    log = TrainLog()
    model.train()
    for step in range(steps):
        result = method.backward(model, x, targets, loss_fn, generator=gen)
        loss = float(result.loss)
        if not math.isfinite(loss):
            log.diverged = True
            opt.zero_grad(set_to_none=True)
            break
        if clip_norm is not None:
            nn.utils.clip_grad_norm_(params, clip_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps - 1:
            log.steps.append(step)
            log.loss.append(loss)
    model.eval()
    return log


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on ``(x, y)``."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
    return correct / max(len(y), 1)


__all__ = ["TrainLog", "train_full_batch", "accuracy"]
