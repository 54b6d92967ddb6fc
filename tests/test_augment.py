"""Batched augmentation against per-image references: crops stay inside the padded image, flips
are exact mirrors, Cutout zeroes exactly its square, seeds reproduce batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flatminima.data import (
    Augment,
    center_crop,
    color_jitter,
    crop_and_resize,
    cutout,
    hflip,
    make_augment,
    normalize,
    random_crop,
    random_resized_crop,
    resized_crop_boxes,
)


def images(n=16, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, c, h, w), generator=g, dtype=torch.int64).to(torch.uint8)


def test_random_crop_is_a_window_of_the_padded_image():
    x = images()
    p = 4
    out = random_crop(x, p, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (p, p, p, p))
    for i in range(len(x)):
        matches = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if torch.equal(padded[i, :, dy:dy + 12, dx:dx + 10], out[i])]
        assert matches, f"image {i} is not a window of its padded original"


def test_random_crop_with_given_offsets_matches_slicing():
    x = images(n=3)
    dy, dx = torch.tensor([0, 8, 3]), torch.tensor([8, 0, 5])
    out = random_crop(x, 4, offsets=(dy, dx))
    padded = F.pad(x, (4, 4, 4, 4))
    for i in range(3):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 12, dx[i]:dx[i] + 10])
    # Offset (4, 4) is the identity; the extreme offsets bring in exactly 4 rows/cols of zeros.
    assert torch.equal(random_crop(x, 4, offsets=(torch.full((3,), 4),) * 2), x)
    # Image 1 (dy = 8, dx = 0): its last 4 rows and first 4 columns come from the zero padding.
    assert (out[1, :, 8:] == 0).all() and (out[1, :, :, :4] == 0).all()
    assert (out[1, :, :8, 4:] != 0).all()


def test_fused_crop_and_flip_equals_crop_then_mirror():
    x = images(n=6)
    dy, dx = torch.tensor([0, 1, 2, 3, 4, 8]), torch.tensor([8, 7, 0, 4, 2, 1])
    mask = torch.tensor([True, False, True, True, False, True])
    fused = random_crop(x, 4, offsets=(dy, dx), flip=mask)
    assert torch.equal(fused, hflip(random_crop(x, 4, offsets=(dy, dx)), mask=mask))


def test_random_crop_uses_every_offset():
    x = images(n=2000, c=1, h=3, w=3)
    x[:] = torch.arange(1, 10, dtype=torch.uint8).view(3, 3)
    out = random_crop(x, 1, generator=torch.Generator().manual_seed(0))
    # Offset (dy, dx) puts the centre pixel (1, 1) at output (2 - dy, 2 - dx); all nine offsets
    # occur, so the centre pixel lands on every position.
    hits = {tuple((o == 5).nonzero()[0].tolist()[1:]) for o in out}
    assert hits == {(r, c) for r in range(3) for c in range(3)}


def test_hflip_is_an_exact_mirror():
    x = images()
    mask = torch.tensor([True, False] * 8)
    out = hflip(x, mask=mask)
    for i in range(len(x)):
        ref = x[i, :, :, torch.arange(9, -1, -1)] if mask[i] else x[i]
        assert torch.equal(out[i], ref)
    # Drawn masks flip about half, and flipping twice with the same mask is the identity.
    g = torch.Generator().manual_seed(3)
    once = hflip(images(n=4000, h=2, w=2), generator=g)
    flipped = (once != images(n=4000, h=2, w=2)).flatten(1).any(1).float().mean()
    assert 0.45 < flipped < 0.55
    assert torch.equal(hflip(out, mask=mask), x)


@pytest.mark.parametrize("size", [1, 4, 5])
def test_cutout_zeroes_exactly_the_requested_square(size):
    x = torch.ones(6, 3, 10, 10)
    cy = torch.tensor([0, 9, 5, 2, 7, 4])
    cx = torch.tensor([0, 9, 5, 8, 1, 4])
    out = cutout(x, size, centers=(cy, cx))
    for i in range(6):
        ref = torch.ones(10, 10)
        y0, x0 = int(cy[i]) - size // 2, int(cx[i]) - size // 2
        ref[max(0, y0):max(0, y0 + size), max(0, x0):max(0, x0 + size)] = 0
        for c in range(3):
            assert torch.equal(out[i, c], ref)


def test_cutout_drawn_squares_have_the_right_area_inside_the_image():
    x = torch.ones(500, 1, 32, 32)
    out = cutout(x, 16, generator=torch.Generator().manual_seed(0))
    zeros = (out == 0).flatten(1).sum(1)
    assert zeros.max() == 256 and zeros.min() >= 64   # clipped at a corner: at least 8x8
    for o in out[:50, 0]:       # each zero set is a full axis-aligned rectangle
        r, c = (o == 0).nonzero().unbind(1)
        assert (r.max() - r.min() + 1) * (c.max() - c.min() + 1) == len(r)


def test_resized_crop_with_the_full_box_is_the_identity():
    x = torch.rand(3, 3, 8, 6)
    boxes = torch.tensor([[0, 0, 8, 6]] * 3)
    torch.testing.assert_close(crop_and_resize(x, boxes, (8, 6)), x)


def test_resized_crop_of_a_subbox_equals_slicing_at_the_same_size():
    x = torch.rand(2, 3, 10, 10)
    boxes = torch.tensor([[2, 3, 5, 4], [0, 5, 10, 5]])
    out = crop_and_resize(x, boxes, (5, 4))
    torch.testing.assert_close(out[0], x[0, :, 2:7, 3:7])
    # A resize of the box: the same as bilinear interpolation of the sliced box.
    out2 = crop_and_resize(x[1:], boxes[1:], (5, 2))
    ref = F.interpolate(x[1:, :, :, 5:], size=(5, 2), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out2, ref)


def test_resized_crop_boxes_follow_the_scale_and_ratio_rule():
    g = torch.Generator().manual_seed(0)
    b = resized_crop_boxes(5000, 32, 32, (0.25, 1.0), (3 / 4, 4 / 3), generator=g)
    top, left, h, w = b.unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    assert area.min() >= 0.2 and area.max() <= 1.0     # rounding moves a box by < 1 pixel
    ratio = w.float() / h.float()
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    # A scale range no box can meet falls back to the central full image.
    b = resized_crop_boxes(4, 10, 10, (5.0, 6.0), generator=g)
    assert b.tolist() == [[0, 0, 10, 10]] * 4


def test_random_resized_crop_shapes_and_dtype():
    x = images(n=4)
    out = random_resized_crop(x, 7, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 7, 7) and out.dtype == torch.uint8


def test_color_jitter_zero_strength_is_identity_and_factors_are_bounded():
    x = torch.rand(8, 3, 5, 5)
    torch.testing.assert_close(color_jitter(x, 0, 0, 0), x)
    out = color_jitter(x, 0.4, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    ratio = out / x.clamp_min(1e-6)
    per_image = ratio.flatten(1)
    unclipped = out.flatten(1) < 1
    for i in range(8):          # brightness: one factor per image, in [0.6, 1.4]
        f = per_image[i][unclipped[i]]
        assert f.max() - f.min() < 1e-4 and 0.6 - 1e-5 <= f.mean() <= 1.4 + 1e-5


def test_saturation_blends_with_the_luma_image():
    x = torch.rand(2, 3, 4, 4)
    # Saturation strength 1 draws factors in [0, 2]; redraw them (order: brightness, contrast,
    # saturation) and blend with the ITU-R 601 luma by hand.
    gray = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    out = color_jitter(x, 0, 0, 1.0, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    fs = [torch.empty(2).uniform_(lo, hi, generator=g) for lo, hi in ((1, 1), (1, 1), (0, 2))][2]
    ref = (fs.view(2, 1, 1, 1) * x + (1 - fs.view(2, 1, 1, 1)) * gray).clamp(0, 1)
    torch.testing.assert_close(out, ref)


def test_normalize_uint8_and_float():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    out = normalize(x, (0.5, 0.2), (0.5, 0.1))
    torch.testing.assert_close(out, torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]]))
    v = torch.tensor([[1.0, 3.0]])
    torch.testing.assert_close(normalize(v, (1.0,), (2.0,)), torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 3, 4, 4), (0.1, 0.2), (1.0, 1.0))


def test_center_crop():
    x = images(n=1, h=8, w=8)
    assert torch.equal(center_crop(x, 4), x[..., 2:6, 2:6])


@pytest.mark.parametrize("preset", ["basic", "cutout", "heavy", "imagenet"])
def test_same_seed_same_batch(preset):
    x = images(n=8, h=32, w=32)
    aug = make_augment(preset, out_size=24) if preset == "imagenet" else make_augment(preset)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = aug(x, mean, std, torch.Generator().manual_seed(7))
    b = aug(x, mean, std, torch.Generator().manual_seed(7))
    c = aug(x, mean, std, torch.Generator().manual_seed(8))
    assert a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pipeline_order_cutout_after_normalization():
    # The hole holds 0 in normalized units, i.e. the data mean (DeVries & Taylor's code).
    x = torch.full((4, 3, 32, 32), 200, dtype=torch.uint8)
    out = Augment(cutout=8)(x, (0.1, 0.2, 0.3), (0.5, 0.5, 0.5),
                            torch.Generator().manual_seed(0))
    vals = torch.unique(out[:, 0])
    torch.testing.assert_close(vals, torch.tensor([0.0, (200 / 255 - 0.1) / 0.5]))
    assert ((out == 0).flatten(1).sum(1) == 3 * 64).any()   # an 8x8 hole, all channels


def test_bad_arguments():
    with pytest.raises(ValueError):
        make_augment("fancy")
    with pytest.raises(ValueError):
        random_crop(images(), -1)
    with pytest.raises(ValueError):
        random_crop(torch.zeros(3, 4, 4), 2)
    with pytest.raises(ValueError):
        color_jitter(images(), 0.1)
    with pytest.raises(ValueError):
        resized_crop_boxes(2, 8, 8, (0.9, 0.1))
