"""``ArrayData``: a data set held as four CPU tensors plus what the loader needs to use them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class ArrayData:
    """Train and test splits as CPU tensors.

    Images are ``uint8`` of shape ``(N, C, H, W)``; vector data is ``float32`` of shape ``(N, D)``
    or ``(N, C, L)``. Labels are ``int64`` in ``[0, num_classes)``. ``mean`` and ``std`` are
    per-channel constants in the units the loader sees after converting uint8 to ``[0, 1]``
    (``(0.0,)``, ``(1.0,)`` for data that is already normalized); :class:`DeviceLoader` applies
    ``(x - mean) / std``.

    ``name`` is the registry name; ``label`` is how results on it must be labelled (for example
    ``"CIFAR-10 (JPEG)"`` for the lossy JPEG copy, which is not comparable with published CIFAR-10
    numbers). ``y_train_clean`` holds the original labels when label noise was injected.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    name: str = ""
    label: str = ""
    y_train_clean: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"x_{split} has {x.shape[0]} rows but y_{split} has {y.shape[0]}")
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(f"x_{split} has shape {tuple(x.shape)}, "
                                 f"expected (N, *{tuple(self.input_shape)})")
            if y.dtype != torch.int64:
                raise ValueError(f"y_{split} must be int64, got {y.dtype}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"y_{split} has labels outside [0, {self.num_classes})")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")
        if not self.label:
            self.label = self.name

    @property
    def is_image(self) -> bool:
        """True for uint8 ``(N, C, H, W)`` image data (the augmentations apply to it)."""
        return self.x_train.dtype == torch.uint8 and self.x_train.dim() == 4

    def __repr__(self) -> str:
        return (f"ArrayData({self.label!r}, train={tuple(self.x_train.shape)}, "
                f"test={tuple(self.x_test.shape)}, classes={self.num_classes}, "
                f"dtype={self.x_train.dtype})")


__all__ = ["ArrayData"]
