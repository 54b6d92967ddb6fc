"""Run by ``torchrun --nproc_per_node=2``: FlatTrainer under the Trainer's own DDP (gloo, CPU).

Each rank trains one optimizer step (two accumulated micro-batches) on its share of the data,
drawing its own perturbation; the gradient before ``optimizer.step`` must equal the mean over the
ranks of ``method.backward`` on each rank's micro-batches with each rank's generator (computed on
a plain copy and all-reduced): reduced once, with the Trainer's ``no_sync`` on the first
micro-batch.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import flatminima as fm  # noqa: E402
from flatminima.integrations import ModelLoss  # noqa: E402
from flatminima.integrations._common import backward_scaler  # noqa: E402
from tests.test_integration_hf import (  # noqa: E402
    Recorder,
    RecordingTrainer,
    args,
    dataset,
    own_loss,
    tiny_bert,
)


def main() -> None:
    name = sys.argv[1]
    rank = int(os.environ["RANK"])
    model = tiny_bert()
    twin = copy.deepcopy(model)
    recorder = Recorder()
    with tempfile.TemporaryDirectory() as out:
        trainer = RecordingTrainer(
            model=model, args=args(Path(out), max_steps=1, ddp_backend="gloo", max_grad_norm=0.0),
            train_dataset=dataset(), callbacks=[recorder], flat_method=fm.create_method(name),
            flat_generator=torch.Generator().manual_seed(100 + rank))
        trainer.batches = []
        trainer.train()
    assert dist.is_initialized() and dist.get_world_size() == 2
    assert len(trainer.batches) == 2 and len(recorder.grads) == 1
    gen = torch.Generator().manual_seed(100 + rank)
    ref = fm.create_method(name)
    for batch in trainer.batches:
        ref.backward(twin, batch, None, ModelLoss(own_loss), scaler=backward_scaler(None, 0.5),
                     generator=gen)
    params = [p for p in twin.parameters() if p.requires_grad]
    for got, p in zip(recorder.grads[0], params, strict=True):
        want = p.grad.clone()
        dist.all_reduce(want)
        torch.testing.assert_close(got, want / 2, rtol=1e-4, atol=1e-7)
    print(f"rank {rank} OK", flush=True)


if __name__ == "__main__":
    main()
