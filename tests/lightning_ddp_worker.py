"""Run by ``torchrun --nproc_per_node=2``: Lightning's "ddp" strategy with the mixin.

Each rank trains one optimizer step on its own batch, drawing its own perturbation; the gradient
at ``optimizer.step`` must equal the mean over the ranks of ``method.backward`` on each rank's
batch with each rank's generator (computed here on a plain copy and all-reduced), i.e. the
gradient was all-reduced exactly once.
"""

from __future__ import annotations

import copy
import os
import sys

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flatminima as fm  # noqa: E402
from tests.test_integration_lightning import Net  # noqa: E402


def main() -> None:
    name = sys.argv[1]
    rank = int(os.environ["RANK"])
    module = Net(fm.create_method(name), torch.Generator().manual_seed(100 + rank))
    twin = copy.deepcopy(module.net)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # Lightning shards it over the ranks
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    got = module.trainer.optimizers[0].grads[0]
    mine = module.seen[0]  # this rank's share, as Lightning's DistributedSampler gave it
    gen = torch.Generator().manual_seed(100 + rank)
    fm.create_method(name).backward(twin, *mine, generator=gen)
    for a, p in zip(got, twin.parameters(), strict=True):
        want = p.grad.clone()
        dist.all_reduce(want)
        torch.testing.assert_close(a, want / 2, rtol=1e-5, atol=1e-7)
    print(f"rank {rank} OK", flush=True)


if __name__ == "__main__":
    main()
