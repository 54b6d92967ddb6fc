"""VGG-16 with batch normalization (Simonyan & Zisserman 2015, configuration D; BN after every
convolution as in Ioffe & Szegedy 2015).

Thirteen 3x3 convolutions in five stages (64, 128, 256, 512, 512 channels), each stage ending in
a 2x2 max-pool, then a classifier with dropout between its fully connected layers, the dropout
the NRS paper keeps in its VGG16 runs. Two heads:

* ``head="cifar"`` (default for inputs under 64 pixels): the five pools leave 1x1x512, followed by
  ``Dropout -> Linear(512, hidden) -> ReLU -> Dropout -> Linear(hidden, hidden) -> ReLU ->
  Linear(hidden, classes)`` with ``hidden = 512``.
* ``head="imagenet"``: adaptive average pool to 7x7, then the paper's ``Linear(25088, 4096) -> ReLU
  -> Dropout -> Linear(4096, 4096) -> ReLU -> Dropout -> Linear(4096, classes)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from flatminima.models.registry import image_shape, register_model

CFG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG features (conv-BN-ReLU, max-pools) and a dropout classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, head: str = "cifar",
                 hidden: int | None = None, dropout: float = 0.5, batch_norm: bool = True) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            # Convolutions keep their bias even before BN, as in the common VGG-BN code (and so
            # the published parameter counts).
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
        self.features = nn.Sequential(*layers)
        if head == "cifar":
            hidden = hidden or 512
            self.pool: nn.Module = nn.Flatten()
            self.classifier = nn.Sequential(
                nn.Dropout(dropout), nn.Linear(512, hidden), nn.ReLU(inplace=True),
                nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes))
        elif head == "imagenet":
            hidden = hidden or 4096
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(7), nn.Flatten())
            self.classifier = nn.Sequential(
                nn.Linear(512 * 49, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes))
        else:
            raise ValueError(f"head must be 'cifar' or 'imagenet', got {head!r}")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)))


@register_model("vgg16")
def vgg16(num_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
          head: str | None = None, hidden: int | None = None, dropout: float = 0.5,
          batch_norm: bool = True) -> VGG:
    """VGG-16-BN; the head follows the input size unless given (see the module docstring)."""
    c, h, w = image_shape(input_shape, "vgg16")
    if head is None:
        head = "cifar" if max(h, w) < 64 else "imagenet"
    if head == "cifar" and (h, w) != (32, 32):
        raise ValueError(f"the cifar head needs 32x32 inputs (1x1 after five pools), got {h}x{w}")
    return VGG(num_classes, c, head, hidden, dropout, batch_norm)


__all__ = ["VGG", "vgg16", "CFG_D"]
