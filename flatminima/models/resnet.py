"""Residual networks (He et al. 2016, "Deep Residual Learning for Image Recognition").

* ``resnet18``: the CIFAR variant used by the SAM / NRS line of work: a 3x3 stride-1 stem with no
  max-pool, then four stages of two BasicBlocks (64, 128, 256, 512 channels), global average pool,
  linear head. With ``stem="imagenet"`` it has the paper's 7x7 stride-2 stem and max-pool.
* ``resnet50`` / ``resnet101``: the ImageNet Bottleneck networks (stage depths 3-4-6-3 and
  3-4-23-3), with the stride on the 3x3 convolution ("ResNet v1.5", as torchvision and most
  reproductions use), so parameter counts match torchvision's published ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from flatminima.models.registry import image_shape, register_model


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4; projection shortcut when needed."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _projection(in_planes, out, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                         nn.BatchNorm2d(out_planes))


class ResNet(nn.Module):
    """Stem, four stages of residual blocks, global average pool, linear head."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], depths: Sequence[int],
                 num_classes: int, in_channels: int = 3, stem: str = "cifar",
                 width: int = 64, zero_init_residual: bool = False) -> None:
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        stages, in_planes = [], width
        for i, depth in enumerate(depths):
            planes = width * 2 ** i
            blocks = []
            for j in range(depth):
                blocks.append(block(in_planes, planes, 2 if (j == 0 and i > 0) else 1))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:  # Goyal et al. 2017: each block starts as the identity
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


@register_model("resnet18")
def resnet18(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
             stem: str = "cifar", zero_init_residual: bool = False, width: int = 64) -> ResNet:
    """ResNet-18, CIFAR stem by default (``stem="imagenet"`` for the paper's); ``width`` is the
    first stage's channel count (64 in the paper; the stages double it), narrower for CPU runs."""
    c, _, _ = image_shape(input_shape, "resnet18")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an integer >= 1, got {width!r}")
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, c, stem, width=width,
                  zero_init_residual=zero_init_residual)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224),
             stem: str = "imagenet", zero_init_residual: bool = False) -> ResNet:
    """ResNet-50 (ImageNet variant, v1.5)."""
    c, _, _ = image_shape(input_shape, "resnet50")
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, c, stem,
                  zero_init_residual=zero_init_residual)


@register_model("resnet101")
def resnet101(num_classes: int = 1000, input_shape: tuple[int, ...] = (3, 224, 224),
              stem: str = "imagenet", zero_init_residual: bool = False) -> ResNet:
    """ResNet-101 (ImageNet variant, v1.5)."""
    c, _, _ = image_shape(input_shape, "resnet101")
    return ResNet(Bottleneck, (3, 4, 23, 3), num_classes, c, stem,
                  zero_init_residual=zero_init_residual)


__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "resnet101"]
