"""Run a worker script of the tests under ``torchrun`` with two CPU ranks (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def two_ranks(script: str, *args: str, cwd: Path) -> str:
    """Run ``tests/<script>`` on two ranks; assert both exit 0 and print ``rank N OK``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "rank 0 OK" in out and "rank 1 OK" in out, out[-4000:]
    return out
