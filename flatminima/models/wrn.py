"""Wide residual networks (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k: a 3x3 stem of 16 channels, three stages of ``n = (d - 4) / 6`` pre-activation basic
blocks (``BN -> ReLU -> conv3x3 -> BN -> ReLU -> [dropout] -> conv3x3``) with ``16k, 32k, 64k``
channels (strides 1, 2, 2), a 1x1 convolution on the shortcut where the width changes, and a final
``BN -> ReLU -> global average pool -> linear``. WRN-28-10 is the NRS paper's CIFAR workhorse.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.models.registry import image_shape, register_model


class WideBlock(nn.Module):
    """Pre-activation basic block; the shortcut taps the pre-activated input when it projects."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.project = in_planes != planes or stride != 1
        self.shortcut = (nn.Conv2d(in_planes, planes, 1, stride, bias=False) if self.project
                         else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn1(x))
        # As in the reference code, a projecting block feeds its 1x1 shortcut the activated input.
        shortcut = self.shortcut(o) if self.project else x
        o = F.relu(self.bn2(self.conv1(o)))
        if self.dropout:
            o = F.dropout(o, self.dropout, self.training)
        return self.conv2(o) + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 (n >= 1), got {depth!r}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, c = [], widths[0]
        for i, w in enumerate(widths[1:]):
            for j in range(n):
                blocks.append(WideBlock(c, w, 2 if (j == 0 and i > 0) else 1, dropout))
                c = w
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


@register_model("wrn28_10")
def wrn28_10(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32), depth: int = 28,
             widen_factor: int = 10, dropout: float = 0.0) -> WideResNet:
    """WideResNet, WRN-28-10 by default; ``depth`` and ``widen_factor`` give any WRN-d-k."""
    c, _, _ = image_shape(input_shape, "wrn28_10")
    return WideResNet(depth, widen_factor, num_classes, c, dropout)


__all__ = ["WideBlock", "WideResNet", "wrn28_10"]
