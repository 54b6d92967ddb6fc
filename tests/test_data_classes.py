"""Class subsets (pretraining / fine-tuning splits) and the generated smoke image set."""

from __future__ import annotations

import pytest
import torch

from flatminima.data import get_dataset


def test_classes_keeps_and_relabels_in_the_given_order():
    full = get_dataset("digits")
    part = get_dataset("digits", classes=[7, 2])
    assert part.num_classes == 2
    assert torch.equal(part.x_train, full.x_train[(full.y_train == 7) | (full.y_train == 2)])
    want = full.y_train[(full.y_train == 7) | (full.y_train == 2)]
    assert torch.equal(part.y_train, (want == 2).long())  # 7 -> 0, 2 -> 1
    assert len(part.y_test) == int(((full.y_test == 7) | (full.y_test == 2)).sum())


@pytest.mark.parametrize("classes", [[], [1, 1], [10], [True]])
def test_bad_classes_are_value_errors(classes):
    with pytest.raises(ValueError, match="classes must be distinct integers"):
        get_dataset("digits", classes=classes)


def test_synthetic_images_are_learnable_and_seeded():
    a = get_dataset("synthetic_images", seed=3)
    b = get_dataset("synthetic_images", seed=3)
    assert torch.equal(a.x_train, b.x_train) and a.x_train.dtype == torch.uint8
    assert a.x_train.shape == (400, 3, 32, 32) and a.num_classes == 10
    # Nearest class mean on the training half classifies the test half well above chance.
    x_tr, x_te = a.x_train.float().flatten(1), a.x_test.float().flatten(1)
    means = torch.stack([x_tr[a.y_train == c].mean(0) for c in range(10)])
    pred = torch.cdist(x_te, means).argmin(1)
    assert (pred == a.y_test).float().mean() > 0.8
