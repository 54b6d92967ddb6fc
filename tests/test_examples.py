"""The examples run as documented (tiny settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_custom_loop_example_runs_and_learns():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--epochs", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert float(last.split("test acc")[1]) > 0.8, last


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _accuracies(out: str) -> list[float]:
    return [float(line.rsplit("acc", 1)[1]) for line in out.splitlines() if " acc " in line]


def test_closure_optimizer_example_trains_both_forms():
    accs = _accuracies(_run("closure_optimizer.py", "--epochs", "5"))
    assert len(accs) == 2 and min(accs) > 0.85, accs


def test_lightning_example_trains():
    pytest.importorskip("lightning")
    assert _accuracies(_run("lightning_nrs.py", "--epochs", "3"))[-1] > 0.85


def test_hf_trainer_example_trains():
    pytest.importorskip("transformers")
    assert _accuracies(_run("hf_trainer_sam.py", "--epochs", "8"))[-1] > 0.9


def test_peft_example_fine_tunes_three_ways():
    pytest.importorskip("peft")
    accs = _accuracies(_run("peft_flat_lora.py", "--epochs", "8"))
    assert len(accs) == 4 and min(accs[1:]) > 0.8, accs  # the first is before fine-tuning


def test_timm_example_trains():
    pytest.importorskip("timm")
    assert _accuracies(_run("timm_sam.py", "--epochs", "2"))[-1] > 0.3
