"""Streaming an image folder too large for memory (ImageNet) through worker processes into the
same device-side augmentation as :class:`DeviceLoader`.

Workers only decode: each image is resized so its shorter side is ``load_size`` and centre-cropped
to ``load_size x load_size`` uint8 (the fixed-size intermediate that lets batches be stacked).
Everything random happens on the device from seeded generators: training uses the ``imagenet``
preset (random resized crop to ``image_size`` + flip), evaluation the centre ``image_size`` crop
(256 -> 224 is the usual ImageNet evaluation). Random resized crops are therefore drawn from the
central square rather than the full image: a small departure from torchvision's pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from flatminima.data.augment import Augment, make_augment, normalize
from flatminima.data.imagefolder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_image,
    find_classes,
    list_images,
)
from flatminima.data.loader import AugmentSpec, epoch_generator, resolve_augment


class _Files(Dataset):
    def __init__(self, paths: Sequence[Path], labels: Sequence[int], load_size: int,
                 mode: str) -> None:
        self.paths, self.labels, self.load_size, self.mode = list(paths), list(labels), \
            load_size, mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        arr = decode_image(self.paths[i], mode=self.mode, size=self.load_size,
                           resize=self.load_size)
        return torch.from_numpy(arr), self.labels[i]


class _EpochBatches(Sampler[list[int]]):
    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int) -> None:
        self.n, self.batch_size, self.shuffle, self.drop_last, self.seed = \
            n, batch_size, shuffle, drop_last, seed
        self.epoch = 0

    def __iter__(self) -> Iterator[list[int]]:
        order = (torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch, 0))
                 if self.shuffle else torch.arange(self.n)).tolist()
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        for s in range(0, stop, self.batch_size):
            yield order[s:s + self.batch_size]

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)


class ImageFolderStream:
    """Batches from ``root/<split>/<class>/*`` decoded by ``num_workers`` processes.

    Same interface as :class:`DeviceLoader`: ``len``, ``set_epoch``, iteration yields
    ``(x_float32_normalized, y_int64)`` on ``device``. ``augment`` defaults to ``"imagenet"`` for
    the train split and a centre crop for the others; pass an :class:`Augment` to change it.
    """

    def __init__(self, root: str | os.PathLike, split: str, batch_size: int, *,
                 image_size: int = 224, load_size: int = 256, shuffle: bool | None = None,
                 drop_last: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 augment: AugmentSpec | str = "auto", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, num_workers: int = 4, mode: str = "RGB",
                 channels_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if image_size > load_size:
            raise ValueError(f"image_size {image_size} exceeds load_size {load_size}")
        root = Path(root)
        train = split == "train"
        classes = find_classes(root / "train")
        paths, labels = list_images(root / split, classes)
        self.classes, self.num_classes = classes, len(classes)
        self.device = torch.device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.channels_last = channels_last
        if augment == "auto":
            augment = make_augment("imagenet", out_size=image_size) if train \
                else Augment(center_crop=image_size)
        self.augment = resolve_augment(augment)
        self.seed = int(seed)
        self._sampler = _EpochBatches(len(paths), batch_size, train if shuffle is None
                                      else shuffle, drop_last, self.seed)
        self._loader = DataLoader(_Files(paths, labels, load_size, mode),
                                  batch_sampler=self._sampler, num_workers=num_workers,
                                  pin_memory=self.device.type == "cuda",
                                  persistent_workers=num_workers > 0)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self._sampler)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        self._sampler.epoch = epoch
        gen = epoch_generator(self.seed, epoch, 1)
        for xb, yb in self._loader:
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            if isinstance(self.augment, Augment):
                out = self.augment(xb, self.mean, self.std, gen)
            else:
                out = normalize(xb, self.mean, self.std)
                if self.augment is not None:
                    out = self.augment(out, gen)
            if self.channels_last:
                out = out.contiguous(memory_format=torch.channels_last)
            yield out, yb


__all__ = ["ImageFolderStream"]
