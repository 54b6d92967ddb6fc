"""Small models that train in minutes on a 2-core CPU: an MLP, a 1-D CNN for MNIST-1D, and a small
2-D CNN. They are the workhorses of the CPU-sized studies and of the tests."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flatminima.models.registry import image_shape, register_model

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU}


def _activation(name: str) -> type[nn.Module]:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class MLP(nn.Module):
    """Fully connected net: flatten, then ``Linear -> act`` per hidden width, then a linear head.

    Parameters: ``sum_i (d_i + 1) d_{i+1}`` over consecutive widths ``d_0 = prod(input_shape)``,
    hidden widths, ``num_classes``.
    """

    def __init__(self, in_features: int, num_classes: int, widths: Sequence[int] = (256, 256),
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        if any(w < 1 for w in widths):
            raise ValueError(f"widths must be positive, got {tuple(widths)!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        act = _activation(activation)
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for w in widths:
            layers += [nn.Linear(d, w), act()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            d = w
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@register_model("mlp")
def mlp(num_classes: int = 10, input_shape: tuple[int, ...] = (40,),
        widths: Sequence[int] = (256, 256), activation: str = "relu",
        dropout: float = 0.0) -> MLP:
    """MLP on flattened inputs; ``widths`` are the hidden layer sizes."""
    return MLP(math.prod(input_shape), num_classes, widths, activation, dropout)


class CNN1D(nn.Module):
    """The convolutional baseline of MNIST-1D (Greydanus 2020): three stride-2 ``Conv1d`` layers of
    ``channels`` filters (kernels 5, 3, 3; padding 1) with ReLU, flattened into a linear head.

    Accepts ``(N, L)`` (a channel axis is added) or ``(N, C, L)`` inputs.
    """

    def __init__(self, length: int, num_classes: int, in_channels: int = 1,
                 channels: int = 25) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        out = length
        for k in (5, 3, 3):
            out = (out + 2 - k) // 2 + 1
        if out < 1:
            raise ValueError(f"input length {length} is too short for cnn1d")
        self.head = nn.Linear(channels * out, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


@register_model("cnn1d")
def cnn1d(num_classes: int = 10, input_shape: tuple[int, ...] = (40,),
          channels: int = 25) -> CNN1D:
    """1-D CNN for MNIST-1D: ``input_shape`` is ``(L,)`` or ``(C, L)``."""
    if len(input_shape) not in (1, 2):
        raise ValueError(f"cnn1d needs (L,) or (C, L) inputs, got input_shape {input_shape}")
    c = 1 if len(input_shape) == 1 else input_shape[0]
    return CNN1D(input_shape[-1], num_classes, c, channels)


class SmallCNN(nn.Module):
    """``[Conv3x3 -> BN -> ReLU -> MaxPool2]`` per entry of ``channels``, global average pool,
    ``Linear -> ReLU -> Linear`` head. Global pooling makes it accept any input size."""

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (32, 64),
                 hidden: int = 128, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in channels:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(w))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.mean(self.features(x), dim=(2, 3)))


@register_model("cnn")
def cnn(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
        channels: Sequence[int] = (32, 64), hidden: int = 128, batch_norm: bool = True) -> SmallCNN:
    """Small 2-D CNN (two conv blocks by default: about 30k parameters)."""
    c, h, w = image_shape(input_shape, "cnn")
    if min(h, w) < 2 ** len(channels):
        raise ValueError(f"{h}x{w} inputs are too small for {len(channels)} pooling stages")
    return SmallCNN(c, num_classes, channels, hidden, batch_norm)


__all__ = ["MLP", "CNN1D", "SmallCNN", "mlp", "cnn1d", "cnn"]
