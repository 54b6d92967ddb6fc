"""The study's data: the two-spirals split and the MNIST subset, each with a poison set.

A :class:`Task` holds everything one trained model needs, as CPU tensors: the training set
(``fit`` + ``val`` for learning-rate tuning, their union ``train`` for the final models), the test
set, the poison set (unseen points of the same distribution, never in train or test) and the
network factory. Poison points are drawn once per task, so full-batch training is deterministic;
the paper's toy code redraws them every epoch, which asks for the same thing in expectation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from flatminima.data.spirals import make_spirals


@dataclass
class Task:
    """Tensors of one study (see the module doc); ``kind`` is ``"spirals"`` or ``"mnist"``."""

    kind: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    x_poison: Tensor
    y_poison: Tensor
    num_val: int

    @property
    def fit(self) -> tuple[Tensor, Tensor]:
        """The training set minus its last ``num_val`` points (tuning runs train on this)."""
        return self.x_train[:-self.num_val], self.y_train[:-self.num_val]

    @property
    def val(self) -> tuple[Tensor, Tensor]:
        """The last ``num_val`` training points (tuning runs are scored on this)."""
        return self.x_train[-self.num_val:], self.y_train[-self.num_val:]


def spirals_task(*, n_per_class: int = 200, noise: float = 1.0, data_seed: int = 0,
                 n_poison_per_class: int = 200, val_fraction: float = 0.25) -> Task:
    """The paper's split: ``2 n_per_class`` spiral points, shuffled, half train, half test.

    The poison set is a separate draw of ``2 n_poison_per_class`` points (seed
    ``data_seed + 1``). The last ``val_fraction`` of the training half is the validation split.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    x, y = make_spirals(n_per_class, noise=noise, seed=data_seed)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(data_seed))
    x, y = x[perm], y[perm]
    half = len(y) // 2
    xp, yp = make_spirals(n_poison_per_class, noise=noise, seed=data_seed + 1)
    num_val = max(1, round(val_fraction * half))
    return Task("spirals", x[:half], y[:half], x[half:], y[half:], xp, yp, num_val)


def mnist_task(root: str | os.PathLike, *, n_train_per_class: int = 50,
               n_poison_per_class: int = 100, n_test: int = 2000, data_seed: int = 0,
               val_fraction: float = 0.2, download: bool = False) -> Task:
    """An MNIST subset: ``n_train_per_class`` training digits per class, poisoned with
    ``n_poison_per_class`` further *held-out training* digits per class (the paper poisons SVHN
    with its ``extra`` split), scored on the first ``n_test`` test digits.

    Pixels are scaled to [0, 1] and standardized with the data set's mean and std.
    """
    from flatminima.data import get_dataset

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    per_class = n_train_per_class + n_poison_per_class
    data = get_dataset("mnist", root, download=download, subset_per_class=per_class,
                       seed=data_seed)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)

    def prep(img: Tensor) -> Tensor:
        return ((img.float() / 255.0 - mean) / std).contiguous()

    gen = torch.Generator().manual_seed(data_seed + 1)
    train_idx, poison_idx = [], []
    for c in range(data.num_classes):
        idx = (data.y_train == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        train_idx.append(idx[:n_train_per_class])
        poison_idx.append(idx[n_train_per_class:per_class])
    tr = torch.cat(train_idx)
    tr = tr[torch.randperm(len(tr), generator=gen)]      # classes mixed, so val covers all
    po = torch.cat(poison_idx)
    n_test = min(n_test, len(data.y_test))
    num_val = max(1, round(val_fraction * len(tr)))
    return Task("mnist", prep(data.x_train[tr]), data.y_train[tr].long(),
                prep(data.x_test[:n_test]), data.y_test[:n_test].long(),
                prep(data.x_train[po]), data.y_train[po].long(), num_val)


__all__ = ["Task", "spirals_task", "mnist_task"]
