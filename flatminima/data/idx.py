"""MNIST from its IDX files (LeCun et al. 1998), raw or gzip-compressed.

IDX layout: a 4-byte magic ``0x00 0x00 <type> <ndim>`` (type ``0x08`` = unsigned byte), then
``ndim`` big-endian uint32 dimension sizes, then the data in C order. MNIST images are
``(N, 28, 28)`` and labels ``(N,)``; both are validated against the header and each other.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from flatminima.data.arraydata import ArrayData
from flatminima.data.download import Remote, ensure_file
from flatminima.data.errors import DataError

_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/")
# md5 of the official .gz files (as published with the widely used mirrors).
_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (``.gz`` or raw) into a uint8 array, validating its header."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes) but the file has "
                        f"{len(data) - header} data bytes (truncated or corrupted)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(root: Path, stem: str, download: bool) -> Path:
    """The raw file if present, else the ``.gz`` (downloaded when absent and allowed)."""
    if (root / stem).is_file():
        return root / stem
    gz = f"{stem}.gz"
    return ensure_file(root, Remote(gz, tuple(m + gz for m in _MIRRORS), _MD5[gz]),
                       download=download, what="MNIST")


def load_mnist(root: str | os.PathLike, *, download: bool = True) -> ArrayData:
    """MNIST: 60,000 train and 10,000 test 28x28 grayscale digits, as uint8 ``(N, 1, 28, 28)``."""
    root = Path(root)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = read_idx(_find(root, f"{prefix}-images-idx3-ubyte", download))
        y = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte", download))
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"MNIST {split} images in {root} have shape {x.shape}, "
                            "expected (N, 28, 28)")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(f"MNIST {split} labels in {root} have shape {y.shape}, "
                            f"expected ({x.shape[0]},)")
        if y.size and y.max() > 9:
            raise DataError(f"MNIST {split} labels in {root} contain {int(y.max())} (> 9)")
        splits[split] = (torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    return ArrayData(*splits["train"], *splits["test"], num_classes=10, input_shape=(1, 28, 28),
                     mean=MNIST_MEAN, std=MNIST_STD, name="mnist", label="MNIST")


__all__ = ["read_idx", "load_mnist", "MNIST_MEAN", "MNIST_STD"]
