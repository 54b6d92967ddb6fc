"""The study's networks: a plain ReLU MLP, the two-spirals one with about 3,400 parameters.

Huang et al. (2019) classify the two spirals with a 6-hidden-layer fully connected ReLU network of
widths 17-18-32-32-31-9 (3,360 weights with their single sigmoid output). The library's methods
and measurements work on softmax logits, so the study gives it two outputs instead (3,370
weights): for two classes, softmax cross-entropy on ``(z0, z1)`` is the sigmoid cross-entropy on
``z1 - z0``, so the objective is the paper's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: Hidden widths of the study's two-spirals network (the paper's 6-layer MLP).
SPIRAL_HIDDEN: tuple[int, ...] = (17, 18, 32, 32, 31, 9)
#: Hidden widths of the MLP the MNIST variant uses (784-128-128-10, about 118,000 weights).
MNIST_HIDDEN: tuple[int, ...] = (128, 128)


def make_mlp(in_features: int, hidden: Sequence[int], num_classes: int, *,
             seed: int) -> nn.Sequential:
    """A ReLU MLP ``in -> hidden[0] -> ... -> hidden[-1] -> num_classes``, PyTorch's default init.

    Inputs of more than one dimension (images) are flattened first. The initial weights come from
    ``seed`` alone (the global RNG is left as it was), so the same seed gives the same network.
    """
    if in_features < 1 or num_classes < 2 or any(int(h) < 1 for h in hidden):
        raise ValueError(f"bad MLP shape: in_features={in_features!r}, hidden={tuple(hidden)!r}, "
                         f"num_classes={num_classes!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def spiral_mlp(*, seed: int) -> nn.Sequential:
    """The two-spirals network: 2 -> 17 -> 18 -> 32 -> 32 -> 31 -> 9 -> 2 (3,370 weights)."""
    return make_mlp(2, SPIRAL_HIDDEN, 2, seed=seed)


def mnist_mlp(*, seed: int, hidden: Sequence[int] = MNIST_HIDDEN) -> nn.Sequential:
    """The MNIST variant's network: 784 -> 128 -> 128 -> 10 by default."""
    return make_mlp(28 * 28, hidden, 10, seed=seed)


__all__ = ["SPIRAL_HIDDEN", "MNIST_HIDDEN", "make_mlp", "spiral_mlp", "mnist_mlp"]
