"""SAM-style training code, switched to flatminima by its construction line.

Trains an MLP on scikit-learn's digits with ``FlatOptimizer``: the closure form (any method; here
NRS, which needs the logits) and the two-step form of the common SAM API (here SAM). Prints the
test accuracy of each. About 10 s on a CPU.

    python examples/closure_optimizer.py [--epochs 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import flatminima as fm
from flatminima.integrations import FlatOptimizer


def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    args = ap.parse_args()
    (x, y), (xt, yt) = digits()

    # 1. The closure form: the closure returns (loss, logits) and does not call backward.
    model = mlp()
    optimizer = FlatOptimizer(model, torch.optim.SGD, fm.NRS(rho=0.05), lr=0.05, momentum=0.9)
    for _ in range(args.epochs):
        for i in range(0, len(y), 64):
            xb, yb = x[i:i + 64], y[i:i + 64]

            def closure(xb=xb, yb=yb):
                out = model(xb)
                return F.cross_entropy(out, yb), out

            optimizer.step(closure)
            optimizer.zero_grad()
    print(f"NRS through step(closure): test acc {accuracy(model, xt, yt):.3f}")

    # 2. The two-step form, as in code written for the common SAM optimizer.
    model = mlp()
    optimizer = FlatOptimizer(model, torch.optim.SGD, fm.SAM(rho=0.05), lr=0.1, momentum=0.9)
    for _ in range(args.epochs):
        for i in range(0, len(y), 64):
            xb, yb = x[i:i + 64], y[i:i + 64]
            F.cross_entropy(model(xb), yb).backward()
            optimizer.first_step(zero_grad=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.second_step(zero_grad=True)
    print(f"SAM through first_step/second_step: test acc {accuracy(model, xt, yt):.3f}")


if __name__ == "__main__":
    main()
