"""Run by ``torchrun --nproc_per_node=2``: the methods on a model sharded with FSDP2.

PyTorch runs ``fully_shard`` on the CPU under gloo. Baseline trains on it (one pass, FSDP's own
reduce-scatter), and its sharded gradient equals the mean of the ranks' plain gradients; every
other method refuses at the call with the documented one-line reason, before any pass or draw,
rather than running its perturbed passes at w (FSDP's forward gathers its own parameters).
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flatminima as fm  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = copy.deepcopy(plain)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    g = torch.Generator().manual_seed(10 + rank)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)

    fm.Baseline().backward(model, x, y)
    xs = [torch.empty_like(x) for _ in range(world)]
    ys = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(xs, x)
    dist.all_gather(ys, y)
    ref = copy.deepcopy(plain)
    sum(F.cross_entropy(ref(a), b) for a, b in zip(xs, ys, strict=True)).div(world).backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)

    for name in fm.list_methods():
        if name == "baseline":
            continue
        method = fm.create_method(name)
        if "optimizer" in method.declared:
            method.optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.zero_grad(set_to_none=True)
        try:
            method.backward(model, x, y, generator=torch.Generator().manual_seed(0))
        except NotImplementedError as e:
            assert "sharded with FSDP2" in str(e), (name, str(e))
            assert all(p.grad is None for p in model.parameters()), name
        else:
            raise AssertionError(f"{name} ran on a sharded model")
    print(f"rank {rank} OK", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
