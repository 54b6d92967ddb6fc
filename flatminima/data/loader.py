"""``DeviceLoader``: the whole data set lives on the training device; batches are index gathers
plus batched augmentation, with no worker processes and no per-sample Python.

Determinism: epoch ``e`` of a loader with seed ``s`` shuffles with a CPU generator seeded from
``(s, e, 0)`` and augments with one seeded from ``(s, e, 1)``, so the same seed and epoch give
bitwise the same batches on the same device, whatever happened before (a resumed run included).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flatminima.data.arraydata import ArrayData
from flatminima.data.augment import Augment, make_augment, normalize

AugmentSpec = str | Augment | Callable[[Tensor, torch.Generator], Tensor] | None


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for ``(seed, epoch, stream)``, mixed by numpy's SeedSequence (no overlap
    between nearby seeds and epochs, unlike ``seed + epoch``)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0]))


def resolve_augment(augment: AugmentSpec) -> Augment | Callable | None:
    """``None`` / a preset name / an :class:`Augment` / a user callable."""
    if augment is None or isinstance(augment, Augment):
        return augment
    if isinstance(augment, str):
        return make_augment(augment)
    if callable(augment):
        return augment
    raise ValueError(f"augment must be None, a preset name or a callable, got {augment!r}")


class DeviceLoader:
    """Mini-batches from tensors held on ``device``.

    Args:
        x, y: all examples (uint8 images ``(N, C, H, W)`` or float features) and int labels.
        batch_size: examples per batch.
        shuffle: a fresh seeded permutation each epoch.
        drop_last: drop the final incomplete batch.
        seed: seed of the shuffling and augmentation draws.
        device: where the data is held and batches are produced.
        augment: ``None``, ``"basic"``, ``"cutout"``, ``"heavy"``, ``"imagenet"``, an
            :class:`Augment`, or a callable ``f(x, generator) -> x`` applied to the normalized
            float32 batch.
        mean, std: per-channel normalization (uint8 is first mapped to [0, 1]).
        storage: ``"float16"`` holds float features in half precision (halves device memory);
            uint8 images are always held as uint8.
        channels_last: yield 4-D batches in ``torch.channels_last`` memory format.

    Iterating yields ``(x_float32_normalized, y_int64)`` on ``device``. Each iteration uses the
    current epoch and then advances it; :meth:`set_epoch` sets it explicitly.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, *, shuffle: bool = True,
                 drop_last: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                 augment: AugmentSpec = None, mean: Sequence[float] = (0.0,),
                 std: Sequence[float] = (1.0,), storage: str | None = None,
                 channels_last: bool = False) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} rows but y has {y.shape[0]}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"bad normalization mean={tuple(mean)} std={tuple(std)}")
        if storage not in (None, "float16", "float32"):
            raise ValueError(f"storage must be None, 'float16' or 'float32', got {storage!r}")
        self.device = torch.device(device)
        if x.dtype != torch.uint8:
            x = x.to(torch.float16 if storage == "float16" else torch.float32)
        self.x = x.to(self.device)
        self.y = y.to(device=self.device, dtype=torch.int64)
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment = resolve_augment(augment)
        if isinstance(self.augment, Augment) and self.x.dim() != 4:
            raise ValueError(f"augmentation {augment!r} needs (N, C, H, W) images, "
                             f"got shape {tuple(self.x.shape)}")
        self.channels_last = channels_last
        self.epoch = 0

    @classmethod
    def from_data(cls, data: ArrayData, split: str = "train", batch_size: int = 128,
                  **kw: Any) -> DeviceLoader:
        """A loader over one split of an :class:`ArrayData`, with its normalization constants.

        Test splits default to ``shuffle=False`` and no augmentation.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split == "test":
            kw.setdefault("shuffle", False)
        kw.setdefault("mean", data.mean)
        kw.setdefault("std", data.std)
        return cls(getattr(data, f"x_{split}"), getattr(data, f"y_{split}"), batch_size, **kw)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        return int(self.x.shape[0])

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration epoch ``epoch`` (its permutation and augmentation draws)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def transform(self, xb: Tensor, generator: torch.Generator | None) -> Tensor:
        """Augment (if set) and normalize one raw batch."""
        if isinstance(self.augment, Augment):
            out = self.augment(xb, self.mean, self.std, generator)
        else:
            out = normalize(xb, self.mean, self.std)
            if self.augment is not None:
                out = self.augment(out, generator)
        if self.channels_last and out.dim() == 4:
            out = out.contiguous(memory_format=torch.channels_last)
        return out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        n = self.x.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=epoch_generator(self.seed, epoch, 0))
        else:
            order = torch.arange(n)
        order = order.to(self.device)
        aug_gen = epoch_generator(self.seed, epoch, 1)
        stop = n - n % self.batch_size if self.drop_last else n
        for start in range(0, stop, self.batch_size):
            idx = order[start:start + self.batch_size]
            yield self.transform(self.x[idx], aug_gen), self.y[idx]


__all__ = ["DeviceLoader", "epoch_generator", "resolve_augment"]
