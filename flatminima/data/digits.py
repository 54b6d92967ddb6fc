"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test part): 1,797 images, no file.

Pixels are integers 0..16; they are returned as float32 vectors scaled to [0, 1] and split
stratified into train and test by a fixed permutation (``split_seed``), 80 / 20 by default.
"""

from __future__ import annotations

import torch

from flatminima.data.arraydata import ArrayData


def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0) -> ArrayData:
    """The digits as float32 ``(N, 64)``; mean and std are the training pixels' own."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    gen = torch.Generator().manual_seed(split_seed)
    test_mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):  # stratified: the same fraction of every class goes to test
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=gen)]
        test_mask[idx[: round(len(idx) * test_fraction)]] = True
    xtr = x[~test_mask]
    mean, std = float(xtr.mean()), float(xtr.std())
    return ArrayData(xtr, y[~test_mask], x[test_mask], y[test_mask], num_classes=10,
                     input_shape=(64,), mean=(mean,), std=(std,), name="digits",
                     label="digits (sklearn 8x8)")


__all__ = ["load_digits"]
