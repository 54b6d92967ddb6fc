"""Checkpoints: atomic writes, weights-only loading, bitwise resume after kill -9, NaN stop."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import flatminima.methods
from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.config import build_config, load_config
from flatminima.experiment.train import TrainingDiverged, train
from tests._history import untimed

TINY = ["dataset=digits", "model=mlp", "model.widths=[24]", "method=nrs", "rho=0.05",
        "val_split=0.1", "tensorboard=false"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flatminima", "train", *TINY, *extra, f"out={out}", "-q"]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [untimed(r) for r in csv.DictReader(f)]


def test_save_is_atomic_and_weights_only(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    ckpt.save({"model": {"w": torch.ones(2)}, "epoch": 1}, path)
    # A crash inside torch.save leaves the previous checkpoint intact and no temp file behind.
    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(RuntimeError):
        ckpt.save({"model": {"w": torch.zeros(2)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


class Evil:
    """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Evil()}, path)
    with pytest.raises(ckpt.CheckpointError, match="corrupted or not a checkpoint"):
        ckpt.load(path)


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save({"model": {"w": torch.randn(100)}}, path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path)
    assert "\n" not in str(e.value)


def test_rng_state_round_trip():
    import random

    import numpy as np

    g = torch.Generator().manual_seed(5)
    state = ckpt.rng_state({"g": g})
    a = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    ckpt.set_rng_state(state, {"g": g})
    b = (torch.rand(3), random.random(), np.random.rand(), torch.rand(2, generator=g))
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2] and torch.equal(a[3], b[3])


def test_kill9_mid_run_then_resume_is_bitwise_identical(tmp_path):
    epochs = ["epochs=5", "batch_size=16"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # The uninterrupted reference runs in this process, with the subprocesses' thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_config(None, [*TINY, *epochs, f"out={ref}", "quiet=true"]))
    finally:
        torch.set_num_threads(threads)

    proc = subprocess.Popen(_cmd(cut, *epochs), env=_env())
    deadline = time.time() + 120
    while not (cut / "last.pt").exists():  # wait for the first epoch's checkpoint
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.01)
    time.sleep(0.15)  # somewhere inside a later epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "metrics.json").exists(), "the run finished before it was killed"
    killed_at = ckpt.load(cut / "last.pt")["epoch"]
    assert 1 <= killed_at < 5

    subprocess.run(_cmd(cut, *epochs), check=True, env=_env(), timeout=300)
    a, b = ckpt.load(ref / "last.pt"), ckpt.load(cut / "last.pt")
    assert a["epoch"] == b["epoch"] == 5
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s_a, s_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                        strict=True):
        assert torch.equal(s_a["momentum_buffer"], s_b["momentum_buffer"])
    assert _rows(ref / "metrics.csv") == _rows(cut / "metrics.csv")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = flatminima.methods.create_method
    calls = {"n": 0}

    def poisoned(name, **hp):
        method = real(name, **hp)
        backward = method.backward

        def wrapped(*a, **k):
            res = backward(*a, **k)
            calls["n"] += 1
            if calls["n"] > 30:  # beyond the first epoch (about 23 steps)
                res.loss = torch.tensor(float("nan"))
            return res
        method.backward = wrapped
        return method

    monkeypatch.setattr(flatminima.methods, "create_method", poisoned)
    cfg = build_config({"dataset": "digits", "model": "mlp", "model.widths": [8], "epochs": 3,
                        "batch_size": 64, "out": str(tmp_path / "r"), "quiet": True,
                        "tensorboard": False})
    with pytest.raises(TrainingDiverged, match=r"loss is nan at epoch 2") as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert ckpt.load(tmp_path / "r" / "last.pt")["epoch"] == 1
    assert not (tmp_path / "r" / "metrics.json").exists()
    assert len(_rows(tmp_path / "r" / "metrics.csv")) == 1


def test_diverging_run_from_the_cli_exits_3_with_one_line(tmp_path, capsys):
    from flatminima.experiment.cli import main

    out = tmp_path / "d"
    rc = main(["train", "dataset=digits", "model=mlp", "model.widths=[8]", "epochs=2", "lr=1e8",
               "tensorboard=false", f"out={out}", "-q"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert err.count("\n") == 1 and "diverged:" in err and "Traceback" not in err
    assert "no checkpoint was written" in err
    assert not (out / "metrics.json").exists()


def test_changed_config_does_not_resume_silently(tmp_path):
    base = {"dataset": "digits", "model": "mlp", "model.widths": [8], "epochs": 1,
            "out": str(tmp_path / "r"), "quiet": True, "tensorboard": False}
    train(build_config(base))
    with pytest.raises(ValueError, match="different config \\(lr\\)"):
        train(build_config({**base, "lr": 0.3}))


def test_metrics_csv_round_trip_keeps_full_precision(tmp_path):
    from flatminima.experiment.logs import read_csv, write_csv

    rows = [{"epoch": 1, "loss": 0.1 + 0.2, "acc": float("nan")},
            {"epoch": 2, "loss": 1 / 3, "extra": "x"}]
    write_csv(tmp_path / "m.csv", rows)
    back = read_csv(tmp_path / "m.csv")
    assert back[0]["loss"] == 0.1 + 0.2 and back[1]["loss"] == 1 / 3
    assert back[0]["acc"] != back[0]["acc"] and back[1]["extra"] == "x"
    assert list(back[0]) == ["epoch", "loss", "acc", "extra"]
