"""``torchrun --nproc_per_node=2 -m flatminima train``: DDP on two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flatminima.experiment.train import shard, split_validation


def test_shards_are_disjoint_equal_and_cover_all_but_the_tail():
    x = torch.arange(11).float()[:, None]
    y = torch.arange(11)
    parts = [shard(x, y, r, 3) for r in range(3)]
    assert all(len(p[1]) == 3 for p in parts)
    seen = torch.cat([p[1] for p in parts])
    assert len(set(seen.tolist())) == 9 and set(seen.tolist()) <= set(range(11))


def test_validation_split_is_stratified_disjoint_and_seeded():
    y = torch.arange(100) % 4
    x = torch.arange(100).float()[:, None]
    xt, yt, xv, yv = split_validation(x, y, 0.2, seed=1)
    assert len(yv) == 20 and torch.bincount(yv).tolist() == [5, 5, 5, 5]
    assert set(xt.flatten().tolist()).isdisjoint(xv.flatten().tolist())
    assert torch.equal(split_validation(x, y, 0.2, seed=1)[3], yv)


def test_torchrun_two_gloo_ranks(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not found")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "flatminima", "train",
         "dataset=digits", "model=mlp", "model.widths=[16]", "method=nrs", "rho=0.05",
         "epochs=2", "batch_size=32", "device=cpu", "tensorboard=false", "threads=1",
         f"out={out}", "-q", "--json"],
        capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["ddp_max_weight_diff"] == 0.0  # replicas stay identical
    assert metrics["test_acc"] > 30  # it learned (10 classes: chance is 10%)
    state = torch.load(out / "last.pt", weights_only=True)
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2
    g0, g1 = (s["generators"]["method"] for s in state["rng"])
    assert not torch.equal(g0, g1)  # each rank draws its own perturbation


@pytest.mark.parametrize("world", ["1", "2"])
def test_torchrun_worker_exits_with_its_status_and_output_but_no_teardown(world):
    # Under torchrun (WORLD_SIZE > 1) the CLI leaves without interpreter teardown, where gloo's
    # threads can abort a finished run; the status and everything printed must still come out.
    code = ("import atexit, sys; atexit.register(print, 'teardown ran'); "
            "from flatminima.experiment.cli import main; sys.argv = ['flatminima'] + sys.argv[1:]; "
            "sys.exit(main())")
    env = {**os.environ, "WORLD_SIZE": world}
    ok = subprocess.run([sys.executable, "-c", code, "--version"], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.splitlines()[0].strip()
    assert ("teardown ran" in ok.stdout) == (world == "1")
    bad = subprocess.run([sys.executable, "-c", code, "train", "no_such_key=1"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "no_such_key" in bad.stderr
