"""PyTorch Lightning: the gradient the optimizer steps on is the method's, window by window.

A LightningModule with the mixin trains under the real ``lightning.Trainer``; its optimizer
records the gradient at ``step`` (after Lightning's unscaling and clipping) and the module records
its weights and buffers at the start of each accumulation window. The reference replays each
window with ``method.backward`` on a copy: each micro-batch scaled by 1/k, under the same
autocast, then ``clip_grad_norm_``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flatminima as fm

L = pytest.importorskip("lightning")

from flatminima.integrations._common import backward_scaler  # noqa: E402
from flatminima.integrations.lightning import FlatMinimaModule  # noqa: E402
from tests._torchrun import two_ranks  # noqa: E402


class RecordingSGD(torch.optim.SGD):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.grads.append([p.grad.detach().clone() for g in self.param_groups
                           for p in g["params"]])
        super().step()
        return loss


class Net(FlatMinimaModule, L.LightningModule):
    def __init__(self, method: fm.Method, generator: torch.Generator | None = None,
                 every: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        self.flat_method = method
        self.flat_generator = generator
        self.every = every
        self.starts: list[dict[str, torch.Tensor]] = []
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # the batches trained on

    def forward(self, x):
        return self.net(x)

    def on_train_batch_start(self, batch, batch_idx):
        if batch_idx % self.every == 0:
            self.starts.append(copy.deepcopy(self.net.state_dict()))

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        return self.flat_step(x, y)

    def configure_optimizers(self):
        return RecordingSGD(self.parameters(), lr=0.1, momentum=0.9)


def data(n: int = 32, batch: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def trainer(**kw) -> L.Trainer:
    base = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False)
    base.update(kw)
    return L.Trainer(**base)


@pytest.mark.parametrize(("name", "precision", "accumulate", "clip"), [
    ("nrs", "32-true", 2, 0.05),
    ("sam", "32-true", 2, None),
    ("friendlysam", "32-true", 1, 0.05),
    ("sam", "bf16-mixed", 2, 0.05),
    ("rwp", "bf16-mixed", 1, None),
])
def test_lightning_steps_on_the_methods_gradient(name, precision, accumulate, clip):
    module = Net(fm.create_method(name), torch.Generator().manual_seed(7), every=accumulate)
    twin = copy.deepcopy(module.net)
    loader = data()
    trainer(precision=precision, accumulate_grad_batches=accumulate,
            gradient_clip_val=clip).fit(module, loader)
    grads = module.trainer.optimizers[0].grads
    assert len(grads) == 4 // accumulate
    ref, gen = fm.create_method(name), torch.Generator().manual_seed(7)
    batches = list(loader)
    clipped = 0
    for window, (start, got) in enumerate(zip(module.starts, grads, strict=True)):
        twin.load_state_dict(start)
        twin.train()
        for p in twin.parameters():
            p.grad = None
        for x, y in batches[window * accumulate:(window + 1) * accumulate]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                ref.backward(twin, x, y, scaler=backward_scaler(None, 1 / accumulate),
                             generator=gen)
        if clip is not None:
            clipped += float(nn.utils.clip_grad_norm_(twin.parameters(), clip)) > clip
        for a, p in zip(got, twin.parameters(), strict=True):
            torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)
    assert clip is None or clipped > 0  # the clipping was active, so it was tested
    # Statistics updated once per micro-batch, whatever the method's passes: the module's
    # running mean after training is the twin's after replaying the last window.
    torch.testing.assert_close(module.net[1].running_mean, twin[1].running_mean)
    metrics = module.trainer.callback_metrics
    assert "train/loss" in metrics and "train/perturbed_loss" in metrics
    assert (name == "nrs") == ("train/divergence" in metrics)


def test_resume_from_a_checkpoint_continues_the_same_run(tmp_path):
    def method():
        return fm.Every(fm.NRS(), every=2, reuse="difference")

    whole = Net(method(), torch.Generator().manual_seed(7))
    trainer(max_epochs=2).fit(whole, data())

    first = Net(method(), torch.Generator().manual_seed(7))
    t = trainer(max_epochs=1)
    t.fit(first, data())
    path = tmp_path / "one.ckpt"
    t.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["flatminima"]
    assert saved["method"] == "every(nrs)" and saved["hparams"]["count"] == 4

    resumed = Net(method(), torch.Generator().manual_seed(123))  # state comes from the file
    trainer(max_epochs=2).fit(resumed, data(), ckpt_path=path)
    assert resumed.flat_method.state_dict()["count"] == 8
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)


def test_a_checkpoint_of_another_method_and_a_missing_method_are_refused(tmp_path):
    t = trainer()
    t.fit(Net(fm.SAM()), data())
    path = tmp_path / "sam.ckpt"
    t.save_checkpoint(path)
    with pytest.raises(ValueError, match="trained with method 'sam'"):
        trainer(max_epochs=2).fit(Net(fm.RPR()), data(), ckpt_path=path)
    with pytest.raises(ValueError, match="set self.flat_method"):
        trainer().fit(Net(None), data())  # type: ignore[arg-type]


def test_flat_step_loss_has_zero_gradient_and_the_clean_value():
    from flatminima.integrations.lightning import sync_loss

    module = nn.Linear(3, 2)
    value = torch.tensor(1.25)
    loss = sync_loss(module, value)
    loss.backward()
    assert float(loss.detach()) == 1.25
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


@pytest.mark.parametrize("name", ["nrs"])
def test_ddp_strategy_reduces_the_methods_gradient_once(name, tmp_path):
    """Two CPU ranks under torchrun (tests/lightning_ddp_worker.py): the gradient at the step is
    the mean over ranks of each rank's own method gradient (its batch, its perturbation)."""
    two_ranks("lightning_ddp_worker.py", name, cwd=tmp_path)
