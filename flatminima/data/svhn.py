"""SVHN (Netzer et al. 2011), cropped-digits format, from the official MATLAB ``.mat`` files.

``train_32x32.mat`` / ``test_32x32.mat`` (and optionally ``extra_32x32.mat``) hold ``X`` of shape
``(32, 32, 3, N)`` uint8 and ``y`` of shape ``(N, 1)`` with labels 1..10, where 10 stands for the
digit 0. They are MATLAB v5 files, read with ``scipy.io.loadmat`` (no pickle involved).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from flatminima.data.arraydata import ArrayData
from flatminima.data.download import Remote, ensure_file
from flatminima.data.errors import DataError

_URL = "http://ufldl.stanford.edu/housenumbers/"
# md5 of the official files (as used by the common loaders of this data set).
_MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
        "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        "extra_32x32.mat": "a93ce644f1a588dc4d68dda5feec44a7"}
# Channel statistics of the train split as commonly reported (not re-measured here: no copy of
# SVHN is available offline).
SVHN_MEAN, SVHN_STD = (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)


def read_svhn_mat(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one SVHN ``.mat`` file: uint8 images ``(N, 3, 32, 32)``, int64 labels 0..9."""
    import scipy.io

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises a variety of types for damaged files
        raise DataError(f"cannot read SVHN file {path}: {type(e).__name__}: {e}") from None
    if "X" not in mat or "y" not in mat:
        raise DataError(f"{path} lacks the 'X' and 'y' variables of an SVHN file")
    x, y = mat["X"], mat["y"]
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DataError(f"{path}: X has shape {x.shape} and dtype {x.dtype}, "
                        "expected uint8 (32, 32, 3, N)")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if y.shape[0] != x.shape[3]:
        raise DataError(f"{path}: {y.shape[0]} labels for {x.shape[3]} images")
    if y.size and (y.min() < 1 or y.max() > 10):
        raise DataError(f"{path}: labels outside 1..10 (min {y.min()}, max {y.max()})")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10


def load_svhn(root: str | os.PathLike, *, download: bool = True,
              extra: bool = False) -> ArrayData:
    """SVHN as uint8 ``(N, 3, 32, 32)``; ``extra=True`` adds the 531,131 "extra" training digits."""
    root = Path(root)

    def get(fn: str) -> tuple[np.ndarray, np.ndarray]:
        return read_svhn_mat(ensure_file(root, Remote(fn, (_URL + fn,), _MD5[fn]),
                                         download=download, what="SVHN"))

    xtr, ytr = get("train_32x32.mat")
    if extra:
        xe, ye = get("extra_32x32.mat")
        xtr, ytr = np.concatenate([xtr, xe]), np.concatenate([ytr, ye])
    xte, yte = get("test_32x32.mat")
    return ArrayData(torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte),
                     torch.from_numpy(yte), num_classes=10, input_shape=(3, 32, 32),
                     mean=SVHN_MEAN, std=SVHN_STD, name="svhn", label="SVHN")


__all__ = ["read_svhn_mat", "load_svhn", "SVHN_MEAN", "SVHN_STD"]
