"""The fast paths of a training run are exact: the decoded-image cache, evaluation every N epochs,
the CPU evaluation batches (benchmarks/train_epoch.py measures what they save)."""

from __future__ import annotations

import importlib
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flatminima.data import DeviceLoader, get_dataset
from flatminima.data import imagefolder as imf
from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.config import load_config
from flatminima.experiment.logs import RunLogger
from flatminima.models import create_model
from tests._history import untimed

T = importlib.import_module("flatminima.experiment.train")


# ---- decoded-array cache ------------------------------------------------------------------------

def write_jpeg_tree(root: Path, classes=("cat", "dog", "eel"), per_class=4, size=8, seed=0,
                    fmt="JPEG") -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                ext = "jpg" if fmt == "JPEG" else fmt.lower()
                Image.fromarray(arr).save(root / split / c / f"{i:03d}.{ext}", fmt)


def decoded_reference(tree: Path) -> dict[str, np.ndarray]:
    """Decoding file by file with PIL, in the loaders' order (sorted classes, sorted files)."""
    out = {}
    classes = sorted(p.name for p in (tree / "train").iterdir())
    for split in ("train", "test"):
        files = [(f, ci) for ci, c in enumerate(classes)
                 for f in sorted((tree / split / c).iterdir())]
        out[f"x_{split}"] = np.stack([imf.decode_image(f) for f, _ in files])
        out[f"y_{split}"] = np.asarray([ci for _, ci in files])
    return out


def assert_same(d, ref) -> None:
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(d, k).numpy(), ref[k]), k
    assert d.x_train.dtype == torch.uint8


def caches(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.npz"))


def test_cache_returns_exactly_the_decoded_arrays(tmp_path):
    write_jpeg_tree(tmp_path / "tree")
    ref = decoded_reference(tmp_path / "tree")
    first = get_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    assert len(caches(tmp_path / "cache")) == 1
    cached = get_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    uncached = get_dataset("imagefolder", tmp_path / "tree", use_cache=False)
    for d in (first, cached, uncached):
        assert_same(d, ref)
        assert d.num_classes == 3 and d.mean == first.mean and d.std == first.std
    # Written atomically: no temporary file is left beside the cache.
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [caches(tmp_path / "cache")[0].name]


def test_threaded_decoding_matches_one_thread(tmp_path):
    write_jpeg_tree(tmp_path / "tree", per_class=700)  # enough for two decoding threads
    _, paths, *_ = imf._list_tree(tmp_path / "tree")
    one = imf._decode_all(paths, "RGB", None, None, 1)
    two = imf._decode_all(paths, "RGB", None, None, 2)
    assert np.array_equal(one, two)
    assert np.array_equal(one, np.stack([imf.decode_image(p) for p in paths]))


def test_a_changed_image_of_the_same_size_is_not_read_from_the_cache(tmp_path):
    # BMP files of one image size all have the same byte size: only the content changes.
    tree = tmp_path / "tree"
    write_jpeg_tree(tree, fmt="BMP")
    old = get_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")
    victim = tree / "train" / "dog" / "001.bmp"
    size = victim.stat().st_size
    from PIL import Image

    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(victim, "BMP")
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert victim.stat().st_size == size
    new = get_dataset("imagefolder", tree, cache_dir=tmp_path / "cache")
    assert_same(new, decoded_reference(tree))
    assert not torch.equal(new.x_train, old.x_train)
    assert len(caches(tmp_path / "cache")) == 2


def _archive(tmp_path: Path) -> Path:
    write_jpeg_tree(tmp_path / "src")
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "pets.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        tf.add(tmp_path / "src" / "train", "train")
        tf.add(tmp_path / "src" / "test", "test")
    return path


def test_archive_cache_hit_needs_no_extracted_tree_and_a_new_archive_is_decoded(tmp_path):
    archive = _archive(tmp_path)
    ref = decoded_reference(tmp_path / "src")
    cache = tmp_path / "cache"
    assert_same(get_dataset("imagefolder", archive.parent, cache_dir=cache), ref)
    import shutil

    shutil.rmtree(cache / "pets")            # the extracted tree is gone, the cache is not
    assert_same(get_dataset("imagefolder", archive.parent, cache_dir=cache), ref)
    assert not (cache / "pets").exists()     # read from the cache, not extracted again
    # A different archive (another time stamp) is decoded again, never read from the old cache.
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert_same(get_dataset("imagefolder", archive.parent, cache_dir=cache), ref)
    assert (cache / "pets" / "train").is_dir() and len(caches(cache)) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "wrong_dtype", "bad_labels",
                                    "missing_key"])
def test_a_damaged_or_malformed_cache_is_rebuilt(tmp_path, damage):
    write_jpeg_tree(tmp_path / "tree")
    ref = decoded_reference(tmp_path / "tree")
    get_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache")
    (path,) = caches(tmp_path / "cache")
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"not an npz at all")
    else:
        if damage == "wrong_dtype":
            arrays["x_train"] = arrays["x_train"].astype(np.float32)
        elif damage == "bad_labels":
            arrays["y_test"] = arrays["y_test"] + 5
        else:
            del arrays["classes"]
        np.savez(path, **arrays)
    assert imf._read_cache(path) is None
    assert_same(get_dataset("imagefolder", tmp_path / "tree", cache_dir=tmp_path / "cache"), ref)
    assert imf._read_cache(path) is not None  # rewritten


def test_default_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("FLATMINIMA_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    data.mkdir()
    assert imf.default_cache_dir(data) == data
    data.chmod(0o555)  # marked read-only: not written into, even by root
    try:
        assert imf.default_cache_dir(data) == tmp_path / "home" / ".cache" / "flatminima"
        monkeypatch.setenv("FLATMINIMA_CACHE", str(tmp_path / "c"))
        assert imf.default_cache_dir(data) == tmp_path / "c"
    finally:
        data.chmod(0o755)
    assert imf.default_cache_dir(data) == tmp_path / "c"  # an explicit choice comes first


# ---- evaluation ---------------------------------------------------------------------------------

def test_evaluate_does_not_depend_on_batch_or_layout():
    torch.manual_seed(0)
    model = create_model("cnn", num_classes=10, input_shape=(3, 16, 16), channels=(8, 16))
    data = get_dataset("synthetic_images", size=16, n_per_class=30)
    x, y = data.x_train, data.y_train
    norm = {"mean": data.mean, "std": data.std}
    # A few steps of fitting: varied predictions and non-trivial BatchNorm statistics.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for xb, yb in DeviceLoader(x, y, 30, **norm):
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            opt.zero_grad()
    ref_loss, ref_acc, ref_top5 = T.evaluate(
        model, DeviceLoader(x, y, 1000, shuffle=False, **norm), F.cross_entropy)
    with torch.no_grad():
        xf = DeviceLoader(x, y, 1000, shuffle=False, **norm).transform(x, None)
        out = model.eval()(xf)
    assert math.isclose(ref_loss, float(F.cross_entropy(out, y)), rel_tol=1e-6)
    assert ref_acc == 100.0 * int((out.argmax(1) == y).sum()) / len(y)
    # Top-5 by brute force: the label's rank among the logits (ties do not occur here).
    rank = (out > out.gather(1, y[:, None])).sum(1)
    assert ref_top5 == 100.0 * int((rank < 5).sum()) / len(y)
    assert ref_acc < ref_top5 < 100.0
    assert len(out.argmax(1).unique()) > 3
    assert model.training is False
    for bs, cl in ((7, False), (128, False), (128, True), (1000, True)):
        loss, acc, top5 = T.evaluate(model, DeviceLoader(x, y, bs, shuffle=False,
                                                         channels_last=cl, **norm),
                                     F.cross_entropy)
        assert acc == ref_acc and top5 == ref_top5
        assert math.isclose(loss, ref_loss, rel_tol=1e-6), (bs, cl)


def test_top5_is_nan_with_five_classes_or_fewer():
    model = torch.nn.Linear(4, 5)
    x, y = torch.randn(20, 4), torch.randint(0, 5, (20,))
    _, _, top5 = T.evaluate(model, [(x, y)], F.cross_entropy)
    assert math.isnan(top5)


TINY = ["dataset=synthetic_images", "model=cnn", "model.channels=[8,16]", "model.hidden=16",
        "val_split=0.2", "augment=basic", "batch_size=32", "tensorboard=false", "quiet=true",
        "threads=1", "epochs=3"]


def _run(out: Path, *extra: str) -> tuple[dict, dict]:
    m = T.train(load_config(None, [*TINY, f"out={out}", *extra]))
    return m, ckpt.load(out / "last.pt")


def _final(m: dict) -> dict:
    return untimed(m, "history", "out")


def _same_weights(a: dict, b: dict) -> None:
    assert a["epoch"] == b["epoch"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                        strict=True):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])


@pytest.mark.parametrize("method", ["baseline", "nrs"])
def test_eval_every_gives_identical_weights_and_final_metrics(tmp_path, method):
    m1, c1 = _run(tmp_path / "every", f"method={method}", "eval_every=1")
    m2, c2 = _run(tmp_path / "two", f"method={method}", "eval_every=2")
    m9, c9 = _run(tmp_path / "end", f"method={method}", "eval_every=9")
    assert _final(m1) == _final(m2) == _final(m9)
    assert m1["fingerprint"] == m2["fingerprint"]  # not part of the run's identity
    _same_weights(c1, c2)
    _same_weights(c1, c9)
    # Validation after every epoch; train and test every eval_every epochs and after the last.
    has_test = [[("test_acc" in r, "train_acc" in r, "val_acc" in r) for r in m["history"]]
                for m in (m1, m2, m9)]
    assert has_test[0] == [(True, True, True)] * 3
    assert has_test[1] == [(False, False, True), (True, True, True), (True, True, True)]
    assert has_test[2] == [(False, False, True), (False, False, True), (True, True, True)]
    assert {"test_top5", "train_top5", "val_top5"} <= set(m9) and m9["test_top5"] >= m9["test_acc"]
    for r1, r2 in zip(m1["history"], m2["history"], strict=True):  # the rows that are there
        assert untimed(r2) == \
            untimed({k: r1[k] for k in r2})


def test_resume_with_eval_every_is_bitwise(tmp_path, monkeypatch):
    ref_m, ref_c = _run(tmp_path / "ref", "method=nrs", "eval_every=2")

    calls = {"n": 0}
    real_log = RunLogger.log

    def dies_after_epoch_two(self, row):  # after the checkpoint of epoch 2 was written
        real_log(self, row)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunLogger, "log", dies_after_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "cut", "method=nrs", "eval_every=2")
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "cut" / "last.pt")["epoch"] == 2
    # Resumed with another eval_every: it changes no weight and no final metric.
    cut_m, cut_c = _run(tmp_path / "cut", "method=nrs", "eval_every=3")
    _same_weights(ref_c, cut_c)
    assert _final(ref_m) == _final(cut_m)


def test_cpu_evaluation_batches_are_capped_and_channels_last(tmp_path, monkeypatch):
    seen = []
    real = T.evaluate

    def spy(model, loader, loss_fn):
        seen.append((loader.batch_size, loader.channels_last))
        return real(model, loader, loss_fn)

    monkeypatch.setattr(T, "evaluate", spy)
    _run(tmp_path / "r", "epochs=1", "eval_batch_size=1000", "device=cpu")
    assert seen and all(s == (T.CPU_EVAL_BATCH, True) for s in seen)
    seen.clear()
    _run(tmp_path / "s", "epochs=1", "eval_batch_size=16", "device=cpu")
    assert seen and all(s == (16, True) for s in seen)
