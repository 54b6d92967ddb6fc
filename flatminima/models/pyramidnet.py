"""PyramidNet (Han, Kim & Kim 2017, "Deep Pyramidal Residual Networks").

Instead of doubling the width at each stage, every residual block widens the network by the same
amount, ``alpha / N`` channels for ``N`` blocks in all, so the width grows linearly from 16 to
``16 + alpha`` (times 4 at the bottleneck outputs). Blocks are ``BN -> conv -> BN -> ReLU -> conv
-> BN`` (bottleneck: 1x1, 3x3, 1x1 with a fourfold expansion, an extra BN-ReLU in between), with no
ReLU after the addition. The shortcut is parameter-free: 2x2 average pooling where the block
strides, and zero-padded channels where the block widens.

PyramidNet-164 (bottleneck, ``n = (164 - 2) / 9 = 18`` blocks per stage) with ``alpha = 270`` is the
setting used in the SAM line of work; the original paper's bottleneck-164 network uses
``alpha = 200`` (27.0M parameters, its Table 4).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.models.registry import image_shape, register_model


class PyramidBlock(nn.Module):
    """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x4) pyramidal residual unit."""

    def __init__(self, in_planes: int, planes: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        self.out_planes = planes * (4 if bottleneck else 1)
        if bottleneck:
            layers = [nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, planes, 1, bias=False),
                      nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
                      nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, self.out_planes, 1, bias=False),
                      nn.BatchNorm2d(self.out_planes)]
        else:
            layers = [nn.BatchNorm2d(in_planes), nn.Conv2d(in_planes, planes, 3, stride, 1,
                                                           bias=False),
                      nn.BatchNorm2d(planes), nn.ReLU(inplace=True),
                      nn.Conv2d(planes, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes)]
        self.residual = nn.Sequential(*layers)
        self.pool = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else nn.Identity()
        # Fixed at construction, so forward has no data-dependent branching.
        self.pad_channels = self.out_planes - in_planes
        if self.pad_channels < 0:
            raise ValueError("a pyramidal block cannot narrow the network")

    def forward(self, x: Tensor) -> Tensor:
        shortcut = self.pool(x)
        if self.pad_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad_channels))
        return self.residual(x) + shortcut


class PyramidNet(nn.Module):
    """PyramidNet for 32x32 inputs: 3x3 stem of 16 channels, three stages, BN-ReLU, pool, linear."""

    def __init__(self, depth: int, alpha: float, num_classes: int, in_channels: int = 3,
                 bottleneck: bool = True) -> None:
        super().__init__()
        per = 9 if bottleneck else 6
        if depth < per + 2 or (depth - 2) % per:
            raise ValueError(f"PyramidNet depth must be {per}n + 2 for "
                             f"{'bottleneck' if bottleneck else 'basic'} blocks, got {depth!r}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        n = (depth - 2) // per
        add = alpha / (3 * n)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(16))
        blocks, width, c = [], 16.0, 16
        for stage in range(3):
            for j in range(n):
                width += add
                block = PyramidBlock(c, int(round(width)), 2 if (j == 0 and stage > 0) else 1,
                                     bottleneck)
                blocks.append(block)
                c = block.out_planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.head = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))


@register_model("pyramidnet164")
def pyramidnet164(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
                  depth: int = 164, alpha: float = 270, bottleneck: bool = True) -> PyramidNet:
    """PyramidNet-164 (bottleneck), ``alpha = 270`` by default; depth, alpha, block configurable."""
    c, _, _ = image_shape(input_shape, "pyramidnet164")
    return PyramidNet(depth, alpha, num_classes, c, bottleneck)


__all__ = ["PyramidBlock", "PyramidNet", "pyramidnet164"]
