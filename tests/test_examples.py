"""The examples run as documented (tiny settings)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_loop_example_runs_and_learns():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_loop.py"), "--epochs", "3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert float(last.split("test acc")[1]) > 0.8, last
