"""FSDP2 (``fully_shard``) with two CPU ranks under gloo, started by torchrun: Baseline trains,
every other method refuses with the documented reason (see tests/fsdp_worker.py)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests._torchrun import two_ranks


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_fsdp2_two_ranks_baseline_trains_and_the_methods_refuse(tmp_path):
    two_ranks("fsdp_worker.py", cwd=tmp_path)
