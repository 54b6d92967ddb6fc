"""LoRA fine-tuning with PEFT: plain, SAM on the adapters, and Flat-LoRA.

An MLP is pretrained on digits 0-4 of scikit-learn's digits, then LoRA adapters (rank 4) are
fine-tuned on digits 5-9 three ways: the plain gradient, SAM in the adapters' space
(``params=adapter_params(model)``), and Flat-LoRA (noise in the merged weights' full space, its
sigma raised by a cosine schedule as in the paper). Prints each one's test accuracy. About 20 s.

    python examples/peft_flat_lora.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import copy
import math

import peft
import torch
from sklearn.datasets import load_digits
from torch import nn

import flatminima as fm
from flatminima.integrations.peft import FlatLoRA, adapter_params


def split(classes):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep] - min(classes)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    n = int(0.7 * len(y))
    return (x[:n], y[:n]), (x[n:], y[n:])


def fit(model, method, x, y, epochs, lr, params, schedule=None):
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    steps, t = epochs * math.ceil(len(y) / 32), 0
    for _ in range(epochs):
        for i in range(0, len(y), 32):
            if schedule is not None:
                schedule(t / steps)
            method.backward(model, x[i:i + 32], y[i:i + 32], generator=gen)
            opt.step()
            opt.zero_grad()
            t += 1


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 5))
    (x, y), _ = split([0, 1, 2, 3, 4])
    fit(base, fm.Baseline(), x, y, 20, 0.05, base.parameters())
    (x, y), (xt, yt) = split([5, 6, 7, 8, 9])
    print(f"pretrained on 0-4, before fine-tuning on 5-9: test acc {accuracy(base, xt, yt):.3f}")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "4"])
    for label in ("LoRA", "LoRA + SAM on the adapters", "Flat-LoRA"):
        model = peft.get_peft_model(copy.deepcopy(base), config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        schedule = None
        if label == "LoRA":
            method = fm.Baseline()
        elif label.startswith("LoRA + SAM"):
            method = fm.SAM(rho=0.05, params=adapter_params(model))
        else:
            method = FlatLoRA(sigma=0.05)

            def schedule(progress, method=method):  # the paper's sigma, raised by a cosine
                method.sigma = 0.05 * (1 - math.cos(math.pi * progress)) / 2

        fit(model, method, x, y, args.epochs, 0.01, trainable, schedule)
        print(f"{label}: test acc {accuracy(model, xt, yt):.3f}")


if __name__ == "__main__":
    main()
