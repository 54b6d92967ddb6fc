"""CIFAR-10 and CIFAR-100 from the official binary-format archives (Krizhevsky 2009).

Binary records (https://www.cs.toronto.edu/~kriz/cifar.html): CIFAR-10 ``<1 label byte><3072
pixel bytes>``, CIFAR-100 ``<1 coarse label byte><1 fine label byte><3072 pixel bytes>``; the
pixels are the red, green and blue 32x32 planes in row-major order, i.e. already ``(C, H, W)``.
The binary format is read with numpy: nothing is unpickled (the "python version" archives are
pickles and are deliberately not supported).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flatminima.data.arraydata import ArrayData
from flatminima.data.download import Remote, ensure_file, safe_extract
from flatminima.data.errors import DataError

_PIXELS = 3 * 32 * 32
# Per-channel statistics of the training images (computed over the 50,000 official train images).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_SPECS = {
    # name: (archive, md5 published on the CIFAR page, folder, train files, test file,
    #        label bytes per record, number of classes, records per split)
    "cifar10": ("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                "cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)],
                "test_batch.bin", 1, 10, (50000, 10000)),
    "cifar100": ("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8",
                 "cifar-100-binary", ["train.bin"], "test.bin", 2, 100, (50000, 10000)),
}


def read_cifar_binary(path: str | os.PathLike, label_bytes: int, num_classes: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Read one binary batch: uint8 images ``(N, 3, 32, 32)`` and int64 labels ``(N,)``.

    For CIFAR-100 (``label_bytes=2``) the fine label (the second byte) is returned.
    """
    path = Path(path)
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read CIFAR file {path}: {e}") from None
    record = label_bytes + _PIXELS
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte "
                        "records (truncated or not a CIFAR binary file)")
    rec = raw.reshape(-1, record)
    labels = rec[:, label_bytes - 1].astype(np.int64)
    if labels.max() >= num_classes:
        raise DataError(f"{path}: label {int(labels.max())} outside [0, {num_classes}) "
                        "(corrupted file or wrong data set)")
    images = rec[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def load_cifar(name: str, root: str | os.PathLike, *, download: bool = True,
               check_size: bool = True) -> ArrayData:
    """CIFAR-10 / CIFAR-100 as uint8 ``(N, 3, 32, 32)``.

    Looks for the extracted folder (``cifar-10-batches-bin`` / ``cifar-100-binary``) in ``root``;
    otherwise for the archive, downloading it (md5-verified) when absent, and extracts it safely.
    ``check_size=False`` accepts batches of any length (files written by tests).
    """
    if name not in _SPECS:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(_SPECS)}")
    archive, md5, folder, train_files, test_file, lb, nc, sizes = _SPECS[name]
    root = Path(root)
    base = root / folder
    needed = [*train_files, test_file]
    if not all((base / f).is_file() for f in needed):
        path = ensure_file(root, Remote(archive, (f"https://www.cs.toronto.edu/~kriz/{archive}",),
                                        md5), download=download, what=name.upper())
        safe_extract(path, root, members=[folder])
        missing = [f for f in needed if not (base / f).is_file()]
        if missing:
            raise DataError(f"archive {path} has no {folder}/{missing[0]}: "
                            f"not the official {name} binary archive")
    splits = []
    for files, n in ((train_files, sizes[0]), ([test_file], sizes[1])):
        parts = [read_cifar_binary(base / f, lb, nc) for f in files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        if check_size and x.shape[0] != n:
            raise DataError(f"{base}: {x.shape[0]} records where the official {name} has {n} "
                            "(truncated file?)")
        splits += [torch.from_numpy(x), torch.from_numpy(y)]
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if nc == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return ArrayData(*splits, num_classes=nc, input_shape=(3, 32, 32), mean=mean, std=std,
                     name=name, label="CIFAR-10" if nc == 10 else "CIFAR-100")


__all__ = ["read_cifar_binary", "load_cifar", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN",
           "CIFAR100_STD"]
