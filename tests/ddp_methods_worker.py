"""Run by ``torchrun --nproc_per_node=2``: each method under DDP equals the mean of the ranks'
objectives.

Checks, on every rank and for every method: the all-reduced gradient equals the average over the
two ranks of the reference gradient of each rank's own objective (its batch, its perturbation); with
``share_noise=True`` every rank uses rank 0's perturbation; gradients are all-reduced exactly once
per call (a counting communication hook). Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flatminima as fm  # noqa: E402
from tests._method_refs import (  # noqa: E402
    NOISY,
    TEST_HPARAMS,
    fixed_noise,
    params_of,
    ref_grad,
    tiny_batch,
    tiny_mlp,
)


class PositionalNoise:
    """Hands out fixed draws, keyed by the (possibly ``module.``-prefixed) names it is given."""

    def __init__(self, draws):
        self.draws, self.i = draws, 0

    def __call__(self, params, generator=None):
        u = self.draws[self.i % len(self.draws)]
        self.i += 1
        return {n: t.clone() for n, t in zip(params, u.values(), strict=True)}


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    plain = tiny_mlp(seed=0)
    model = DDP(copy.deepcopy(plain))
    calls = {"n": 0}

    def counting_allreduce(state, bucket):
        calls["n"] += 1
        t = bucket.buffer().div_(world)
        return dist.all_reduce(t, async_op=True).get_future().then(lambda f: f.value()[0])

    model.register_comm_hook(None, counting_allreduce)
    batches = [tiny_batch(seed=100 + r, n=8) for r in range(world)]
    draws = [[fixed_noise(params_of(plain), seed=10 + 7 * r + i) for i in range(3)]
             for r in range(world)]
    failures = []
    for share in (False, True):
        for name, hp in TEST_HPARAMS.items():
            if share and name not in NOISY:
                continue
            kw = dict(hp)
            if name in NOISY:
                kw.update(noise=PositionalNoise(draws[rank]), share_noise=share)
            method = fm.create_method(name, **kw)
            model.zero_grad(set_to_none=True)
            calls["n"] = 0
            x, y = batches[rank]
            method.backward(model, x, y)
            want = None
            for r in range(world):
                us = draws[0] if share else draws[r]
                g = ref_grad(name, hp, plain, *batches[r], us)
                want = g if want is None else {n: want[n] + g[n] for n in g}
            for (n, p) in model.module.named_parameters():
                if not torch.allclose(p.grad, want[n] / world, rtol=1e-9, atol=1e-11):
                    failures.append(f"{name} share={share} {n}")
            if calls["n"] != 1:
                failures.append(f"{name} share={share}: {calls['n']} all-reduces, expected 1")
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        print(f"rank {rank} FAILED: " + "; ".join(failures), flush=True)
        return 1
    print(f"rank {rank} OK", flush=True)
    return 0


if __name__ == "__main__":
    # Exit without interpreter teardown, as the flatminima CLI does under torchrun: gloo's
    # threads can abort it after the work is done (see leave_without_teardown).
    from flatminima.experiment.cli import leave_without_teardown

    leave_without_teardown(main())
