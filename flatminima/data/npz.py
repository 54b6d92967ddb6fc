"""A user's own arrays in one ``.npz`` file with ``x_train, y_train, x_test, y_test``.

Loaded with ``allow_pickle=False``: object arrays (which would need unpickling) are refused.
uint8 arrays of rank 4 are images ``(N, C, H, W)`` (``layout="nhwc"`` converts ``(N, H, W, C)``);
anything else is converted to float32 and used as given (``mean=(0,)``, ``std=(1,)``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from flatminima.data.arraydata import ArrayData
from flatminima.data.errors import DataError
from flatminima.data.imagefolder import channel_stats

KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | os.PathLike, *, layout: str = "nchw",
             num_classes: int | None = None) -> ArrayData:
    """Read the four arrays, check shapes, dtypes and labels, and wrap them as :class:`ArrayData`.

    ``num_classes`` defaults to ``max(label) + 1`` over both splits.
    """
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc', got {layout!r}")
    path = Path(path)
    if path.is_dir():
        path = path / "data.npz"
    if not path.is_file():
        raise DataError(f"missing data file {path}: save your arrays there with "
                        "numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {missing} (needs {', '.join(KEYS)})")
            arrs = {k: z[k] for k in KEYS}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as a numpy .npz of plain arrays: {e}") from None
    for split in ("train", "test"):
        x, y = arrs[f"x_{split}"], arrs[f"y_{split}"]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{path}: y_{split} must be a 1-D integer array, "
                            f"got shape {y.shape} dtype {y.dtype}")
        if x.ndim < 2 or x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: x_{split} has shape {x.shape} for {y.shape[0]} labels")
        if y.size and y.min() < 0:
            raise DataError(f"{path}: y_{split} has a negative label {int(y.min())}")
    nc = int(max(arrs["y_train"].max(initial=-1), arrs["y_test"].max(initial=-1))) + 1
    if num_classes is not None:
        if nc > num_classes:
            raise DataError(f"{path}: label {nc - 1} outside [0, {num_classes})")
        nc = num_classes
    image = arrs["x_train"].dtype == np.uint8 and arrs["x_train"].ndim == 4
    xs = []
    for split in ("train", "test"):
        x = arrs[f"x_{split}"]
        if image:
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{path}: x_train is uint8 images but x_{split} is "
                                f"{x.dtype} {x.shape}")
            if layout == "nhwc":
                x = x.transpose(0, 3, 1, 2)
            xs.append(torch.from_numpy(np.ascontiguousarray(x)))
        else:
            if not np.issubdtype(x.dtype, np.number):
                raise DataError(f"{path}: x_{split} has non-numeric dtype {x.dtype}")
            xs.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise DataError(f"{path}: x_train rows are {tuple(xs[0].shape[1:])} but x_test rows are "
                        f"{tuple(xs[1].shape[1:])}")
    mean, std = channel_stats(xs[0]) if image else ((0.0,), (1.0,))
    return ArrayData(xs[0], torch.from_numpy(arrs["y_train"].astype(np.int64)),
                     xs[1], torch.from_numpy(arrs["y_test"].astype(np.int64)),
                     num_classes=nc, input_shape=tuple(xs[0].shape[1:]), mean=mean, std=std,
                     name="npz", label=f"npz:{path.name}")


__all__ = ["load_npz", "KEYS"]
