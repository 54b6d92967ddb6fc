"""DeviceLoader, the streaming image-folder loader, the registry, subsets and label noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatminima.data import (
    ArrayData,
    Augment,
    DeviceLoader,
    ImageFolderStream,
    add_label_noise,
    get_dataset,
    list_datasets,
    subset,
)
from flatminima.data.spirals import make_spirals


def toy(n=50, classes=5, image=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, 256, (n, 3, 8, 8), generator=g).to(torch.uint8) if image
         else torch.randn(n, 6, generator=g))
    y = torch.arange(n) % classes
    return x, y


def collect(loader):
    xs, ys = zip(*list(loader), strict=True)
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("n,bs,drop", [(50, 16, False), (50, 16, True), (48, 16, True),
                                       (5, 16, False), (5, 16, True)])
def test_len_and_coverage(n, bs, drop):
    x, y = toy(n)
    ld = DeviceLoader(x, y, bs, drop_last=drop, seed=1)
    batches = list(ld)
    assert len(batches) == len(ld) == (n // bs if drop else -(-n // bs))
    sizes = [len(b[1]) for b in batches]
    assert all(s == bs for s in sizes[:-1]) and (not drop or all(s == bs for s in sizes))
    # Without augmentation every example appears at most once, all of them without drop_last.
    xs = torch.cat([b[0] for b in batches]) if batches else torch.empty(0, 3, 8, 8)
    ref = x.float().div(255).flatten(1)
    rows = {tuple(r.tolist()) for r in ref}
    assert all(tuple(r.tolist()) in rows for r in xs.flatten(1))
    if not drop:
        assert len({tuple(r.tolist()) for r in xs.flatten(1)}) == n


def test_same_seed_and_epoch_same_batches_even_with_augmentation():
    x, y = toy(64)
    aug = Augment(crop_padding=2, flip=True, cutout=4)
    kw = dict(batch_size=16, seed=3, augment=aug, mean=(0.5,) * 3, std=(0.2,) * 3)
    a, b = DeviceLoader(x, y, **kw), DeviceLoader(x, y, **kw)
    ea0, eb0 = collect(a), collect(b)
    assert torch.equal(ea0[0], eb0[0]) and torch.equal(ea0[1], eb0[1])
    ea1 = collect(a)                      # auto-advanced to epoch 1: a new order and new draws
    assert not torch.equal(ea1[0], ea0[0])
    b.set_epoch(1)
    eb1 = collect(b)
    assert torch.equal(ea1[0], eb1[0]) and torch.equal(ea1[1], eb1[1])
    a.set_epoch(0)                        # going back reproduces epoch 0 exactly
    assert torch.equal(collect(a)[0], ea0[0])
    c = DeviceLoader(x, y, **{**kw, "seed": 4})
    assert not torch.equal(collect(c)[1], ea0[1])
    # Same order, different augmentation draws: the shuffle and augmentation streams differ.
    d = DeviceLoader(x, y, **{**kw, "shuffle": False})
    e = DeviceLoader(x, y, **{**kw, "shuffle": False})
    e.set_epoch(1)
    assert not torch.equal(collect(d)[0], collect(e)[0])


def test_no_shuffle_keeps_order_and_normalizes():
    x, y = toy(10)
    ld = DeviceLoader(x, y, 4, shuffle=False, mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 1.0))
    xs, ys = collect(ld)
    assert torch.equal(ys, y)
    ref = (x.double() / 255 - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1).double()) \
        / torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1).double()
    torch.testing.assert_close(xs.double(), ref, rtol=1e-6, atol=1e-6)
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64


def test_float_storage_and_vector_data():
    x, y = toy(20, image=False)
    ld = DeviceLoader(x, y, 8, shuffle=False, storage="float16", mean=(1.0,), std=(2.0,))
    assert ld.x.dtype == torch.float16
    xs, _ = collect(ld)
    torch.testing.assert_close(xs, (x.half().float() - 1) / 2)
    with pytest.raises(ValueError, match="images"):
        DeviceLoader(x, y, 8, augment="basic")


def test_callable_augment_gets_normalized_batch_and_generator():
    x, y = toy(12)
    seen = []

    def aug(xb, gen):
        seen.append((xb.dtype, isinstance(gen, torch.Generator)))
        return xb + torch.rand(xb.shape[0], 1, 1, 1, generator=gen)

    a = collect(DeviceLoader(x, y, 5, augment=aug, seed=0))[0]
    b = collect(DeviceLoader(x, y, 5, augment=aug, seed=0))[0]
    assert torch.equal(a, b) and seen[0] == (torch.float32, True)


def test_channels_last_output():
    x, y = toy(8)
    xb, _ = next(iter(DeviceLoader(x, y, 4, channels_last=True)))
    assert xb.is_contiguous(memory_format=torch.channels_last)


def test_from_data_uses_the_set_constants_and_does_not_shuffle_test():
    x, y = toy(20)
    d = ArrayData(x, y, x[:6], y[:6], num_classes=5, input_shape=(3, 8, 8), mean=(0.5,) * 3,
                  std=(0.25,) * 3, name="toy")
    test = DeviceLoader.from_data(d, "test", 4)
    assert torch.equal(collect(test)[1], y[:6])
    assert test.mean == (0.5,) * 3
    with pytest.raises(ValueError):
        DeviceLoader.from_data(d, "val")


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=2.5),
                                 dict(batch_size=4, std=(0.0,)), dict(batch_size=4,
                                                                      augment=3)])
def test_loader_bad_arguments(bad):
    x, y = toy(8)
    with pytest.raises(ValueError):
        DeviceLoader(x, y, **bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_batches_equal_cpu_batches():
    x, y = toy(64)
    kw = dict(batch_size=16, seed=5, augment="basic")
    cpu = collect(DeviceLoader(x, y, **kw))
    gpu = collect(DeviceLoader(x, y, device="cuda", **kw))
    # Same draws, so the same crops, flips and order; normalization may differ in the last bit.
    assert torch.equal(gpu[1].cpu(), cpu[1])
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-6, atol=1e-6)


# ---- subsets and label noise ------------------------------------------------------------------

def toy_data(n=100, classes=4):
    x = torch.arange(n, dtype=torch.float32)[:, None]
    y = torch.tensor([i % classes for i in range(n)])
    return ArrayData(x, y, x[:8], y[:8], num_classes=classes, input_shape=(1,), name="toy")


def test_subset_takes_n_per_class_seeded_in_original_order():
    d = toy_data()
    s = subset(d, 7, seed=0)
    assert s.y_train.bincount().tolist() == [7] * 4
    idx = s.x_train[:, 0].long()
    assert torch.equal(d.y_train[idx], s.y_train) and (idx.diff() > 0).all()
    assert torch.equal(subset(d, 7, seed=0).x_train, s.x_train)
    assert not torch.equal(subset(d, 7, seed=1).x_train, s.x_train)
    assert torch.equal(s.x_test, d.x_test)
    # More than a class holds: the whole class.
    assert subset(d, 1000).y_train.bincount().tolist() == [25] * 4


def test_label_noise_flips_exactly_the_fraction_to_other_classes():
    d = toy_data(200, 5)
    n = add_label_noise(d, 0.3, seed=2)
    changed = n.y_train != n.y_train_clean
    assert int(changed.sum()) == 60
    assert torch.equal(n.y_train_clean, d.y_train)
    assert n.y_train.min() >= 0 and n.y_train.max() < 5
    assert torch.equal(add_label_noise(d, 0.3, seed=2).y_train, n.y_train)
    full = add_label_noise(d, 1.0, seed=0)
    assert (full.y_train != d.y_train).all()


def test_get_dataset_applies_subset_then_noise():
    d = get_dataset("digits", subset_per_class=10, label_noise=0.5, seed=0)
    assert len(d.y_train) == 100 and d.y_train_clean.bincount().tolist() == [10] * 10
    assert int((d.y_train != d.y_train_clean).sum()) == 50


# ---- registry and the file-free sets ----------------------------------------------------------

def test_registry_names_and_errors():
    assert {"mnist1d", "digits", "spirals", "mnist", "cifar10", "cifar100", "svhn",
            "imagefolder", "npz"} <= set(list_datasets())
    with pytest.raises(ValueError, match="'imagenet22k'"):
        get_dataset("imagenet22k")
    with pytest.raises(ValueError):
        get_dataset("digits", subset_per_class=0)
    with pytest.raises(ValueError):
        get_dataset("digits", label_noise=1.5)
    with pytest.raises(ValueError, match="'digits' takes no option 'colour'"):
        get_dataset("digits", colour=True)


def test_mnist1d_is_generated_deterministically():
    state = np.random.get_state()
    a = get_dataset("mnist1d", num_samples=200)
    assert np.array_equal(np.random.get_state()[1], state[1])   # global RNG untouched
    b = get_dataset("mnist1d", num_samples=200)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    assert torch.equal(a.x_train, b.x_train) and a.x_train.dtype == torch.float32
    assert abs(float(torch.cat([a.x_train, a.x_test]).std()) - 1) < 1e-3   # the package's scaling


def test_digits_split_is_stratified():
    d = get_dataset("digits")
    assert len(d.y_train) + len(d.y_test) == 1797 and d.input_shape == (64,)
    frac = d.y_test.bincount().float() / (d.y_test.bincount() + d.y_train.bincount()).float()
    assert (frac - 0.2).abs().max() < 0.01
    assert float(d.x_train.max()) == 1.0


def test_spirals_are_the_generator_split_in_halves():
    d = get_dataset("spirals", seed=3, n_per_class=10, noise=0.5)
    x, y = make_spirals(10, noise=0.5, seed=3)
    assert torch.equal(d.x_train, x[0::2]) and torch.equal(d.x_test, x[1::2])
    assert torch.equal(d.y_train, y[0::2]) and d.num_classes == 2


# ---- streaming image folder -------------------------------------------------------------------

@pytest.mark.parametrize("workers", [0, 2])
def test_stream_matches_in_memory_decode(tmp_path, workers):
    from tests.test_data_formats import write_tree

    write_tree(tmp_path, per_class=5, size=(12, 12))
    mem = get_dataset("imagefolder", tmp_path, use_cache=False)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    test = ImageFolderStream(tmp_path, "test", 4, image_size=8, load_size=12, num_workers=workers,
                             mean=mean, std=std)
    xs, ys = collect(test)
    assert torch.equal(ys, mem.y_test)
    ref = (mem.x_test[..., 2:10, 2:10].float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(xs, ref)
    train = ImageFolderStream(tmp_path, "train", 4, image_size=8, load_size=12, seed=1,
                              num_workers=workers, drop_last=True)
    assert len(train) == 2
    a = collect(train)
    train.set_epoch(0)
    b = collect(train)
    assert a[0].shape == (8, 3, 8, 8) and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
