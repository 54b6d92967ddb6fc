"""NRS in your own training loop: scikit-learn digits, an MLP, SGD with a cosine schedule.

    python examples/custom_loop.py [--method nrs] [--epochs 30]

Shows the whole contract: a method accumulates its gradient into ``p.grad``; the optimizer, the
schedule, weight decay and gradient clipping are yours. Prints train/test accuracy per epoch.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import flatminima as fm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="nrs", choices=fm.list_methods())
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1200], perm[1200:]

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    method = fm.create_method(args.method)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    steps_per_epoch = len(train) // 64
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)

    for epoch in range(args.epochs):
        model.train()
        order = train[torch.randperm(len(train), generator=gen)]
        correct = 0
        for i in range(steps_per_epoch):
            idx = order[i * 64 : (i + 1) * 64]
            result = method.backward(model, x[idx], y[idx], F.cross_entropy, generator=gen)
            nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            correct += int((result.logits.argmax(1) == y[idx]).sum())
        model.eval()
        with torch.no_grad():
            test_acc = float((model(x[test]).argmax(1) == y[test]).float().mean())
        print(f"epoch {epoch + 1:3d}  loss {float(result.loss):.4f}  "
              f"train acc {correct / (steps_per_epoch * 64):.3f}  test acc {test_acc:.3f}")


if __name__ == "__main__":
    main()
