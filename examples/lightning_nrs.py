"""An existing LightningModule trained with NRS: three lines changed.

The digits classifier below is an ordinary LightningModule; the lines marked ``# flatminima``
are the whole change. Lightning's own gradient accumulation, clipping, scheduler and checkpoints
apply. About 15 s on a CPU.

    python examples/lightning_nrs.py [--epochs 10]
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flatminima as fm
from flatminima.integrations.lightning import FlatMinimaModule


class Digits(FlatMinimaModule, L.LightningModule):  # flatminima: the mixin, first
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(),
                                 nn.Linear(128, 10))
        self.lr = lr
        self.flat_method = fm.NRS(rho=0.05, alpha=1.0)  # flatminima: the method

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.flat_step(x, y)  # flatminima: was `return F.cross_entropy(self(x), y)`

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return {"optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, 50)}


def loaders():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=256)
    return train, val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    train, val = loaders()
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=2,
                        gradient_clip_val=5.0)
    module = Digits()
    trainer.fit(module, train, val)
    metrics = trainer.validate(module, val, verbose=False)[0]
    print(f"NRS in Lightning: val acc {metrics['val/acc']:.3f}")


if __name__ == "__main__":
    main()
