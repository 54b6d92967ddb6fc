"""Loaders on small files written here in each real format (IDX, CIFAR binary, SVHN .mat, image
folder, npz), including truncated and corrupted files, which must fail with a one-line DataError."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from flatminima.data import DataError, get_dataset
from flatminima.data.cifar import read_cifar_binary
from flatminima.data.idx import read_idx
from flatminima.data.svhn import read_svhn_mat


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


# ---- IDX (MNIST) ------------------------------------------------------------------------------

def idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_mnist(root: Path, n_train=30, n_test=10, gz=True, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        arrays[prefix] = (x, y)
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            name = root / f"{prefix}-{kind}-ubyte"
            data = idx_bytes(arr)
            if gz:
                name.with_name(name.name + ".gz").write_bytes(gzip.compress(data))
            else:
                name.write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_roundtrip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    d = get_dataset("mnist", tmp_path, download=False)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_train.dtype == torch.uint8
    assert np.array_equal(d.x_train[:, 0].numpy(), arrays["train"][0])
    assert np.array_equal(d.y_test.numpy(), arrays["t10k"][1].astype(np.int64))
    assert d.num_classes == 10 and d.input_shape == (1, 28, 28)


def test_idx_truncated_and_corrupted(tmp_path):
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    good = idx_bytes(x)
    (tmp_path / "trunc").write_bytes(good[:-5])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(tmp_path / "trunc")
    assert "trunc" in one_line(e)
    (tmp_path / "magic").write_bytes(b"\x12\x34" + good[2:])
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "float").write_bytes(b"\x00\x00\x0d" + good[3:])
    with pytest.raises(DataError, match="unsigned byte"):
        read_idx(tmp_path / "float")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(good)[:40])
    with pytest.raises(DataError):
        read_idx(tmp_path / "bad.gz")


def test_mnist_label_out_of_range_and_mismatch(tmp_path):
    write_mnist(tmp_path)
    bad = np.full(30, 11, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(bad)))
    with pytest.raises(DataError, match="11"):
        get_dataset("mnist", tmp_path, download=False)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(np.zeros(29, np.uint8))))
    with pytest.raises(DataError, match="labels"):
        get_dataset("mnist", tmp_path, download=False)


def test_missing_file_names_it_and_where_to_put_it(tmp_path):
    with pytest.raises(DataError) as e:
        get_dataset("mnist", tmp_path, download=False)
    msg = one_line(e)
    assert "train-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg


def test_real_mnist_from_shared_data(shared_data):
    d = get_dataset("mnist", shared_data / "mnist", download=False)
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    # The README's train pixel statistics, and 10 classes present.
    from flatminima.data.imagefolder import channel_stats

    (mean,), (std,) = channel_stats(d.x_train)
    assert abs(mean - 0.1307) < 1e-4 and abs(std - 0.3081) < 1e-4
    assert d.y_train.bincount().tolist()[:3] == [5923, 6742, 5958]   # official class sizes


# ---- CIFAR binary -----------------------------------------------------------------------------

def cifar_records(n, label_bytes, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, (n, label_bytes), dtype=np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return np.concatenate([labels, pixels], axis=1), labels[:, -1], pixels.reshape(n, 3, 32, 32)


def write_cifar_archive(root: Path, name: str, n=20, extra_member: tarfile.TarInfo | None = None):
    folder, files, lb, nc = (("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)]
                              + ["test_batch.bin"], 1, 10) if name == "cifar10" else
                             ("cifar-100-binary", ["train.bin", "test.bin"], 2, 100))
    truth = {}
    buf = root / f"{'cifar-10' if name == 'cifar10' else 'cifar-100'}-binary.tar.gz"
    with tarfile.open(buf, "w:gz") as tf:
        for i, f in enumerate(files):
            rec, y, x = cifar_records(n, lb, nc, seed=i)
            truth[f] = (x, y)
            info = tarfile.TarInfo(f"{folder}/{f}")
            info.size = rec.nbytes
            tf.addfile(info, io.BytesIO(rec.tobytes()))
        if extra_member is not None:
            tf.addfile(extra_member, io.BytesIO(b"x" * extra_member.size))
    return truth


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_binary_archive_roundtrip(tmp_path, name):
    truth = write_cifar_archive(tmp_path, name)
    d = get_dataset(name, tmp_path, download=False, check_size=False)
    train_files = [f for f in truth if "test" not in f]
    x_ref = np.concatenate([truth[f][0] for f in train_files])
    y_ref = np.concatenate([truth[f][1] for f in train_files])
    assert np.array_equal(d.x_train.numpy(), x_ref)
    assert np.array_equal(d.y_train.numpy(), y_ref.astype(np.int64))
    test_file = next(f for f in truth if "test" in f)
    assert np.array_equal(d.x_test.numpy(), truth[test_file][0])
    assert d.num_classes == (10 if name == "cifar10" else 100)
    # The official sizes are enforced by default.
    with pytest.raises(DataError, match="records"):
        get_dataset(name, tmp_path, download=False)


def test_cifar100_uses_the_fine_label(tmp_path):
    rec = np.zeros((1, 2 + 3072), np.uint8)
    rec[0, 0], rec[0, 1] = 3, 77           # coarse 3, fine 77
    (tmp_path / "b.bin").write_bytes(rec.tobytes())
    _, y = read_cifar_binary(tmp_path / "b.bin", 2, 100)
    assert y.tolist() == [77]


def test_cifar_truncated_and_bad_label(tmp_path):
    rec, _, _ = cifar_records(3, 1, 10)
    (tmp_path / "t.bin").write_bytes(rec.tobytes()[:-100])
    with pytest.raises(DataError, match="truncated") as e:
        read_cifar_binary(tmp_path / "t.bin", 1, 10)
    assert "t.bin" in one_line(e)
    rec[1, 0] = 10
    (tmp_path / "l.bin").write_bytes(rec.tobytes())
    with pytest.raises(DataError, match="label 10"):
        read_cifar_binary(tmp_path / "l.bin", 1, 10)


def test_cifar_corrupted_archive(tmp_path):
    write_cifar_archive(tmp_path, "cifar10")
    arc = tmp_path / "cifar-10-binary.tar.gz"
    arc.write_bytes(arc.read_bytes()[:300])
    with pytest.raises(DataError, match="archive") as e:
        get_dataset("cifar10", tmp_path, download=False, check_size=False)
    one_line(e)
    assert not (tmp_path / "cifar-10-batches-bin").exists()   # nothing half-extracted


def test_cifar_archive_with_traversal_member_is_refused(tmp_path):
    evil = tarfile.TarInfo("../evil.txt")
    evil.size = 4
    write_cifar_archive(tmp_path, "cifar10", extra_member=evil)
    with pytest.raises(DataError, match="outside"):
        get_dataset("cifar10", tmp_path, download=False, check_size=False)
    assert not (tmp_path.parent / "evil.txt").exists()
    assert not (tmp_path / "cifar-10-batches-bin").exists()


# ---- SVHN .mat --------------------------------------------------------------------------------

def write_svhn(root: Path, n=12, seed=0):
    import scipy.io

    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "test"):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        scipy.io.savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
        out[split] = (x, y)
    return out


def test_svhn_roundtrip_and_label_10_is_digit_0(tmp_path):
    truth = write_svhn(tmp_path)
    d = get_dataset("svhn", tmp_path, download=False)
    x, y = truth["train"]
    assert d.x_train.shape == (12, 3, 32, 32)
    assert np.array_equal(d.x_train.numpy(), x.transpose(3, 2, 0, 1))
    assert np.array_equal(d.y_train.numpy(), y[:, 0].astype(np.int64) % 10)
    assert (d.y_train == 0).sum() == (y == 10).sum()


def test_svhn_truncated_and_malformed(tmp_path):
    import scipy.io

    write_svhn(tmp_path)
    p = tmp_path / "train_32x32.mat"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(DataError, match="train_32x32.mat") as e:
        read_svhn_mat(p)
    one_line(e)
    scipy.io.savemat(p, {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [11]])})
    with pytest.raises(DataError, match="labels outside"):
        read_svhn_mat(p)
    scipy.io.savemat(p, {"X": np.zeros((28, 28, 2), np.uint8), "y": np.array([[1], [2]])})
    with pytest.raises(DataError, match="shape"):
        read_svhn_mat(p)
    scipy.io.savemat(p, {"images": np.zeros((2, 2))})
    with pytest.raises(DataError, match="'X'"):
        read_svhn_mat(p)


# ---- image folder -----------------------------------------------------------------------------

def write_tree(root: Path, classes=("cat", "dog"), per_class=3, size=(8, 6), fmt="PNG", seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    truth = {"train": [], "test": []}
    for split in ("train", "test"):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i:03d}.{fmt.lower()}", fmt)
                truth[split].append((arr, ci))
    return truth


def test_imagefolder_roundtrip_lossless_png(tmp_path):
    truth = write_tree(tmp_path / "tree")
    d = get_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert d.x_train.shape == (6, 3, 6, 8) and d.num_classes == 2
    for i, (arr, c) in enumerate(truth["train"]):
        assert np.array_equal(d.x_train[i].numpy(), arr.transpose(2, 0, 1))
        assert d.y_train[i] == c
    # Per-channel statistics measured on the training pixels.
    ref = np.stack([a for a, _ in truth["train"]]).astype(np.float64) / 255
    np.testing.assert_allclose(d.mean, ref.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(d.std, ref.std(axis=(0, 1, 2)), rtol=1e-5)
    # The cache gives the same arrays on the second load.
    d2 = get_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").glob(".tree-*.npz"))
    assert torch.equal(d2.x_train, d.x_train) and torch.equal(d2.y_test, d.y_test)


def test_imagefolder_from_archive_and_resize(tmp_path):
    write_tree(tmp_path / "src", size=(12, 10))
    (tmp_path / "data").mkdir()
    with tarfile.open(tmp_path / "data" / "pets.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "src" / "train", "train")
        tf.add(tmp_path / "src" / "test", "test")
    d = get_dataset("imagefolder", tmp_path / "data", image_size=8, resize=8)
    assert d.x_train.shape == (6, 3, 8, 8)
    assert (tmp_path / "data" / "pets" / "train" / "cat").is_dir()   # extracted into the data dir


def test_imagefolder_errors(tmp_path):
    write_tree(tmp_path / "t")
    (tmp_path / "t" / "train" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(DataError, match="bad.jpg") as e:
        get_dataset("imagefolder", tmp_path / "t", use_cache=False)
    one_line(e)
    (tmp_path / "t" / "train" / "cat" / "bad.jpg").unlink()
    (tmp_path / "t" / "test" / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        get_dataset("imagefolder", tmp_path / "t", use_cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image folder"):
        get_dataset("imagefolder", tmp_path / "empty")
    write_tree(tmp_path / "mixed")
    from PIL import Image
    Image.new("RGB", (5, 5)).save(tmp_path / "mixed" / "train" / "dog" / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        get_dataset("imagefolder", tmp_path / "mixed", use_cache=False)


@pytest.mark.slow
def test_cifar10_jpeg_copy_from_shared_data(shared_data, tmp_path):
    d = get_dataset("imagefolder", shared_data, archive="cifar10-jpeg.tar.gz", cache_dir=tmp_path)
    assert d.label == "CIFAR-10 (JPEG)"
    assert d.x_train.shape == (50000, 3, 32, 32) and d.x_test.shape == (10000, 3, 32, 32)
    assert d.y_train.bincount().tolist() == [5000] * 10
    # The channel means published with the copy.
    np.testing.assert_allclose(d.mean, (0.4913, 0.4821, 0.4465), atol=2e-4)


# ---- npz --------------------------------------------------------------------------------------

def test_npz_images_and_vectors(tmp_path):
    rng = np.random.default_rng(0)
    xi = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "img.npz", x_train=xi, y_train=np.arange(10) % 3,
             x_test=xi[:4], y_test=np.array([0, 1, 2, 2]))
    d = get_dataset("npz", tmp_path / "img.npz", layout="nhwc")
    assert d.x_train.shape == (10, 3, 5, 5) and d.num_classes == 3
    assert np.array_equal(d.x_train.numpy(), xi.transpose(0, 3, 1, 2))
    xv = rng.normal(size=(8, 7)).astype(np.float64)
    np.savez(tmp_path / "vec.npz", x_train=xv, y_train=np.arange(8) % 2, x_test=xv[:2],
             y_test=np.array([1, 0]))
    d = get_dataset("npz", tmp_path / "vec.npz")
    assert d.x_train.dtype == torch.float32 and d.input_shape == (7,)
    assert d.mean == (0.0,) and d.std == (1.0,)


def test_npz_refuses_pickles_and_bad_files(tmp_path):
    obj = np.array([{"a": 1}, None], dtype=object)
    np.savez(tmp_path / "pickled.npz", x_train=obj, y_train=np.array([0, 1]),
             x_test=obj, y_test=np.array([0, 1]))
    with pytest.raises(DataError, match="pickled.npz") as e:
        get_dataset("npz", tmp_path / "pickled.npz")
    one_line(e)
    np.savez(tmp_path / "missing.npz", x_train=np.zeros((2, 2)), y_train=np.zeros(2, int))
    with pytest.raises(DataError, match="x_test"):
        get_dataset("npz", tmp_path / "missing.npz")
    good = tmp_path / "good.npz"
    np.savez(good, x_train=np.zeros((2, 2)), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 2)), y_test=np.zeros(1, int))
    (tmp_path / "trunc.npz").write_bytes(good.read_bytes()[:-60])
    with pytest.raises(DataError, match="trunc.npz"):
        get_dataset("npz", tmp_path / "trunc.npz")
    np.savez(tmp_path / "neg.npz", x_train=np.zeros((2, 2)), y_train=np.array([0, -1]),
             x_test=np.zeros((1, 2)), y_test=np.zeros(1, int))
    with pytest.raises(DataError, match="negative"):
        get_dataset("npz", tmp_path / "neg.npz")
    np.savez(tmp_path / "rows.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 2)), y_test=np.zeros(1, int))
    with pytest.raises(DataError, match="shape"):
        get_dataset("npz", tmp_path / "rows.npz")
    with pytest.raises(DataError, match="numpy.savez"):
        get_dataset("npz", tmp_path / "absent.npz")
