"""Curvature during training (``curvature_every``): the values recorded, their agreement with a
direct measurement of the saved model, an unchanged trajectory, resume, and bad values."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch

import flatminima as fm
from flatminima.data import DeviceLoader
from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.cli import main
from flatminima.experiment.config import build_config
from flatminima.experiment.curvature import TRACE_MATVECS
from flatminima.experiment.measure import load_run
from flatminima.experiment.train import build_data, loss_function, train
from tests._history import untimed
from tests._interrupt import train_interrupted

TINY = {"dataset": "digits", "model": "mlp", "model.widths": [16], "model.dropout": 0.1,
        "method": "nrs", "rho": 0.05, "epochs": 3, "batch_size": 64, "quiet": True,
        "tensorboard": False, "threads": 1}
CURV = {"curvature_every": 1, "curvature_examples": 200, "curvature_trace": True,
        "curvature_last_layer": True}
KEYS = ("hessian_top", "hessian_trace", "hessian_top_last_layer")


def _strip(history):
    return [untimed(r, *KEYS) for r in history]


def _same_weights(a, b):
    a, b = ckpt.load(a / "last.pt"), ckpt.load(b / "last.pt")
    assert list(a["model"]) == list(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_values_recorded_each_epoch_match_a_direct_measurement(tmp_path):
    cfg = build_config({**TINY, **CURV, "out": str(tmp_path / "r")})
    m = train(cfg)
    assert [r["epoch"] for r in m["history"]] == [1, 2, 3]
    for row in m["history"]:
        assert all(math.isfinite(row[k]) and row[k] > 0 for k in KEYS), row
        assert row["hessian_trace"] > row["hessian_top"]
        assert row["hessian_top_last_layer"] <= row["hessian_top"] * (1 + 1e-3)  # interlacing
    assert m["hessian_top"] == m["history"][-1]["hessian_top"]  # final metrics carry it
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [float(r["hessian_top"]) for r in rows] == [r["hessian_top"] for r in m["history"]]

    # The documented subset: curvature_examples of the training split, randperm(data_seed).
    model, _, d = load_run(cfg, examples=1)
    x, y = d["train"]
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(cfg.data_seed))
    idx = idx[:200].sort().values
    batch = next(iter(DeviceLoader(x[idx], y[idx], 200, shuffle=False, mean=d["data"].mean,
                                   std=d["data"].std)))
    loss_fn = loss_function(cfg)

    def gen():
        return torch.Generator().manual_seed(cfg.seed)

    top = float(fm.hessian.eigenvalues(model, loss_fn, batch, k=1, generator=gen())[0])
    last = float(fm.hessian.eigenvalues(model, loss_fn, batch, k=1, params="last_layer",
                                        generator=gen())[0])
    tr = float(fm.hessian.trace(model, loss_fn, batch, num_matvecs=TRACE_MATVECS,
                                generator=gen()))
    final = m["history"][-1]
    assert final["hessian_top"] == pytest.approx(top, rel=1e-5)
    assert final["hessian_top_last_layer"] == pytest.approx(last, rel=1e-5)
    assert final["hessian_trace"] == pytest.approx(tr, rel=1e-5)
    # An independent, tighter run agrees with the recorded value to the estimator's tolerance.
    tight = float(fm.hessian.eigenvalues(model, loss_fn, batch, k=1, tol=1e-7,
                                         generator=torch.Generator().manual_seed(7))[0])
    assert final["hessian_top"] == pytest.approx(tight, rel=1e-3)


@pytest.fixture
def images(tmp_path):
    g = np.random.default_rng(0)
    path = tmp_path / "img.npz"
    np.savez(path, x_train=g.integers(0, 256, (96, 3, 8, 8), dtype=np.uint8),
             y_train=np.arange(96) % 3, x_test=g.integers(0, 256, (12, 3, 8, 8), dtype=np.uint8),
             y_test=np.arange(12) % 3)
    return path


@pytest.mark.parametrize("kind", ["mlp_dropout_nrs", "cnn_batchnorm_sam"])
def test_measuring_leaves_the_trajectory_bitwise_unchanged(kind, tmp_path, images):
    base = dict(TINY)
    if kind == "cnn_batchnorm_sam":  # BatchNorm buffers must not move during a measurement
        base = {**TINY, "dataset": "npz", "data_root": str(images), "model": "cnn",
                "model.channels": [4, 8], "model.hidden": 16, "method": "sam",
                "batch_size": 32}
        base.pop("model.widths"), base.pop("model.dropout")
    plain = train(build_config({**base, "out": str(tmp_path / "plain")}))
    measured = train(build_config({**base, **CURV, "out": str(tmp_path / "measured")}))
    _same_weights(tmp_path / "plain", tmp_path / "measured")
    assert _strip(plain["history"]) == _strip(measured["history"])
    assert all(k in r for r in measured["history"] for k in KEYS)


def test_every_n_epochs_and_after_the_last_and_resume_continues(tmp_path, monkeypatch):
    base = {**TINY, "epochs": 5, "curvature_every": 2, "curvature_examples": 100}
    ref = train(build_config({**base, "out": str(tmp_path / "ref")}))
    assert [("hessian_top" in r) for r in ref["history"]] == [False, True, False, True, True]
    assert not any("hessian_trace" in r for r in ref["history"])
    rows = list(csv.DictReader(open(tmp_path / "ref" / "metrics.csv")))
    assert [r["hessian_top"] == "" for r in rows] == [True, False, True, False, False]

    # Interrupted during epoch 3 (its checkpoint never written), then resumed.
    cut = build_config({**base, "out": str(tmp_path / "cut")})
    train_interrupted(cut, monkeypatch, at_save=3)
    assert ckpt.load(tmp_path / "cut" / "last.pt")["epoch"] == 2
    resumed = train(cut)
    _same_weights(tmp_path / "ref", tmp_path / "cut")
    strip = [untimed(r) for r in ref["history"]]
    assert [untimed(r) for r in resumed["history"]] == strip


def test_values_reach_tensorboard(tmp_path):
    train(build_config({**TINY, "epochs": 1, "curvature_every": 1, "curvature_examples": 50,
                        "tensorboard": True, "out": str(tmp_path / "tb")}))
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb" / "tb").glob("events.*"))
    assert b"hessian/top" in events


def test_curvature_keys_are_part_of_the_identity():
    a = build_config(TINY)
    assert build_config({**TINY, "curvature_every": 2}).fingerprint() != a.fingerprint()
    assert build_config({**TINY, "curvature_examples": 64}).fingerprint() != a.fingerprint()


@pytest.mark.parametrize("item,needle", [
    ("curvature_every=-1", "curvature_every=-1: must be >= 0"),
    ("curvature_every=1.5", "curvature_every=1.5: must be an integer"),
    ("curvature_examples=0", "curvature_examples=0: must be >= 1"),
    ("curvature_trace=maybe", "curvature_trace='maybe': must be true or false"),
    ("curvature_last_layer=2", "curvature_last_layer=2: must be true or false"),
])
def test_bad_values_are_one_line_errors(item, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["train", "dataset=digits", "model=mlp", "epochs=1", item, "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_build_data_unchanged_by_measurement_subset():
    # The subset is drawn from its own generator: the global random stream is not touched.
    cfg = build_config({**TINY, **CURV})
    from flatminima.experiment.curvature import curvature_batch

    state = torch.get_rng_state()
    x, y = curvature_batch(cfg, build_data(cfg))
    assert torch.equal(state, torch.get_rng_state())
    assert len(y) == 200 and x.dtype == torch.float32


def test_a_measurement_drawing_from_the_global_stream_does_not_leak(tmp_path, monkeypatch):
    """The probe restores the global random state, so even an estimator that drew from it
    (dropout's stream here) would leave the trajectory unchanged."""
    import flatminima.experiment.curvature as curvature

    real = curvature.measure

    def greedy(cfg, model, batch):
        torch.rand(10)
        return real(cfg, model, batch)

    base = {**TINY, "epochs": 2, "curvature_examples": 50}
    train(build_config({**base, "out": str(tmp_path / "plain")}))
    monkeypatch.setattr(curvature, "measure", greedy)
    train(build_config({**base, "curvature_every": 1, "out": str(tmp_path / "measured")}))
    _same_weights(tmp_path / "plain", tmp_path / "measured")
