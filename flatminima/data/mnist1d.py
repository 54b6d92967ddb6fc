"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package: no download.

Each example is a 1-D signal of 40 points made from one of ten digit templates by padding,
shearing, translation and correlated plus i.i.d. noise. The package's defaults give 5,000
examples split 4,000 / 1,000; the generator is deterministic in its ``seed`` (default 42, the
package's own default).
"""

from __future__ import annotations

import torch

from flatminima.data.arraydata import ArrayData


def load_mnist1d(*, num_samples: int = 5000, train_split: float = 0.8, data_seed: int = 42,
                 **overrides: object) -> ArrayData:
    """Generate MNIST-1D as float32 ``(N, 40)`` (already centred and scaled to unit variance).

    ``overrides`` replace entries of ``mnist1d.data.get_dataset_args()`` (e.g. ``iid_noise_scale``).
    ``mnist1d.data.get_dataset`` is avoided on purpose: with its defaults it tries a download.
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be at least 10 (one per class), got {num_samples!r}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be in (0, 1), got {train_split!r}")
    import mnist1d.data
    import numpy as np

    args = mnist1d.data.get_dataset_args()
    unknown = [k for k in overrides if not hasattr(args, k)]
    if unknown:
        raise ValueError(f"unknown MNIST-1D arguments {unknown}")
    args.num_samples, args.train_split, args.seed = int(num_samples), float(train_split), data_seed
    for k, v in overrides.items():
        setattr(args, k, v)
    # The package seeds numpy's global generator; keep the caller's global state intact.
    state = np.random.get_state()
    try:
        d = mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(state)
    x_train = torch.as_tensor(d["x"], dtype=torch.float32)
    x_test = torch.as_tensor(d["x_test"], dtype=torch.float32)
    return ArrayData(x_train, torch.as_tensor(d["y"], dtype=torch.int64), x_test,
                     torch.as_tensor(d["y_test"], dtype=torch.int64), num_classes=10,
                     input_shape=tuple(x_train.shape[1:]), mean=(0.0,), std=(1.0,),
                     name="mnist1d", label="MNIST-1D")


__all__ = ["load_mnist1d"]
