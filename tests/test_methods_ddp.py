"""Every method under DistributedDataParallel with two CPU ranks (gloo), started by torchrun."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests._torchrun import two_ranks


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo")
def test_ddp_two_ranks_equal_mean_of_rank_objectives(tmp_path):
    two_ranks("ddp_methods_worker.py", cwd=tmp_path)
