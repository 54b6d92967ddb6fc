"""Shared test configuration: one thread per process, opt-in slow tests, the offline data."""

from __future__ import annotations

import os
from pathlib import Path

# The tests run tiny models, where extra threads only cost synchronisation; on a busy 2-core
# machine two spinning threads per process slowed single ops by one to two orders of magnitude.
# Subprocesses (CLI, torchrun) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run slow tests")


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def shared_data() -> Path:
    """The offline copy of MNIST / CIFAR-10 (JPEG) beside the project; skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def process_group(tmp_path_factory):
    """A real one-process gloo group, so that DistributedDataParallel can be built in a test."""
    import torch.distributed as dist

    store = tmp_path_factory.mktemp("dist") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
