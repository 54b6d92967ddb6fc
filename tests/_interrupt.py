"""Test helper: a training run interrupted when its n-th checkpoint would be written."""

from __future__ import annotations

import pytest

from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.train import train


def train_interrupted(cfg, monkeypatch, at_save: int) -> None:
    """Run ``train(cfg)`` and stop it (KeyboardInterrupt) instead of its ``at_save``-th
    checkpoint write, as a kill between two epochs would."""
    real_save, calls = ckpt.save, {"n": 0}

    def save(obj, path):
        calls["n"] += 1
        if calls["n"] == at_save:
            raise KeyboardInterrupt
        real_save(obj, path)

    monkeypatch.setattr(ckpt, "save", save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(ckpt, "save", real_save)
