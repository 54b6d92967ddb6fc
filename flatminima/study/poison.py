r"""Poisoned training objective: fit the training set, be wrong on unseen points of the same law.

Huang et al. (2019) drive a network to a bad minimum by adding to the training loss a term that
rewards wrong answers on extra points drawn from the data distribution:

.. math::

    L_\beta(w) = \frac{1}{n} \sum_{i \le n} \ell_{CE}(f_w(x_i), y_i)
               + \beta \, \frac{1}{m} \sum_{j \le m} \ell_{R}(f_w(\tilde x_j), \tilde y_j),
    \qquad \ell_R(z, y) = -\log(1 - p_y(z)),

with :math:`p = \mathrm{softmax}(z)` and :math:`\beta` the *poison factor*. :math:`\ell_R`, the
reverse cross-entropy, is small when the model puts little mass on the true class, whatever wrong
class takes it. It is what the paper's SVHN code minimizes on SVHN's extra split
(``dirtyPredictions = 1 - predictions`` before the cross-entropy); on the two spirals the paper
flips the labels of the extra points instead. For two classes the two coincide exactly
(:math:`-\log(1 - p_y) = -\log p_{1-y}`), so the study uses :math:`\ell_R` everywhere: for ten
classes flipping would have to choose a wrong class, which turns the poison into fitting label
noise to arbitrary targets (a different, easier-to-memorize task), while :math:`\ell_R` only asks
the model to be wrong.

The paper's toy code concatenates poison points into each batch, so its loss is the mean over
:math:`n + \beta n` points, :math:`(L_{train} + \beta L_{poison}) / (1 + \beta)`: the same
minimizers, and the same direction of every gradient, as :math:`L_\beta` above.

Poison points ride in the same batch as the clean ones, marked by a negative target:
``-1 - y`` stands for "true class ``y``, reward a wrong answer". So :class:`PoisonedLoss` is a plain
``loss_fn(logits, targets)`` that every method of :mod:`flatminima.methods` accepts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def reverse_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    r"""``-log(1 - softmax(logits)[y])``, computed stably.

    Uses :math:`1 - p_y = \sum_{j \ne y} e^{z_j} / \sum_j e^{z_j}`, so
    :math:`\ell_R = \mathrm{logsumexp}(z) - \mathrm{logsumexp}(z_{j \ne y})`, finite even when
    :math:`p_y` rounds to one.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must have shape [N, C] with C >= 2, got {tuple(logits.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    true_class = targets[:, None] == torch.arange(logits.shape[1], device=logits.device)
    others = logits.masked_fill(true_class, float("-inf"))
    loss = torch.logsumexp(logits, dim=1) - torch.logsumexp(others, dim=1)
    if reduction == "mean":
        return loss.mean()
    return loss.sum() if reduction == "sum" else loss


def poison_targets(targets: Tensor) -> Tensor:
    """Mark targets as poison: ``y -> -1 - y`` (so class 0 becomes -1)."""
    if (targets < 0).any():
        raise ValueError("poison_targets expects true class indices >= 0")
    return -1 - targets


class PoisonedLoss:
    r"""``loss_fn(logits, targets)``: mean cross-entropy on clean rows (``targets >= 0``) plus
    ``factor`` times mean reverse cross-entropy on poison rows (``targets < 0``, class ``-1 - t``).

    With ``factor = 0`` (or no poison rows) it is plain cross-entropy on the clean rows. A batch
    with no clean rows contributes only the poison term. See the module doc for the objective.

    Example::

        loss_fn = PoisonedLoss(0.1)
        x = torch.cat([x_train, x_unseen]); t = torch.cat([y_train, poison_targets(y_unseen)])
        method.backward(model, x, t, loss_fn)
    """

    def __init__(self, factor: float) -> None:
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"poison factor must be a finite number >= 0, got {factor!r}")
        self.factor = float(factor)

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        poison = targets < 0
        clean = ~poison
        loss = logits.new_zeros(())
        if clean.any():
            loss = loss + F.cross_entropy(logits[clean], targets[clean])
        if self.factor > 0 and poison.any():
            loss = loss + self.factor * reverse_cross_entropy(logits[poison], -1 - targets[poison])
        return loss

    def __repr__(self) -> str:
        return f"PoisonedLoss(factor={self.factor})"


__all__ = ["reverse_cross_entropy", "poison_targets", "PoisonedLoss"]
