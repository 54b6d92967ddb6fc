"""A timm model trained with any flatminima method in a plain loop.

``timm.create_model`` builds the network (here ``resnet10t``, its BatchNorm statistics updated
once per step by every method); scikit-learn's digits, upsampled to 3x32x32, are the data. The
method is a command-line choice. About 30 s on a CPU.

    python examples/timm_sam.py [--method sam] [--epochs 2]
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import flatminima as fm


def images():
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=32, mode="bilinear").repeat(1, 3, 1, 1)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:640], y[:640]), (x[1400:], y[1400:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="sam", choices=fm.list_methods())
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    (x, y), (xt, yt) = images()
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    method = fm.create_method(args.method)
    if "optimizer" in method.declared:  # MSAM reads the optimizer's momentum
        method.optimizer = opt
    gen = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        for i in range(0, len(y), 32):
            result = method.backward(model, x[i:i + 32], y[i:i + 32], generator=gen)
            opt.step()
            opt.zero_grad(set_to_none=True)
        print(f"epoch {epoch + 1}: train loss {float(result.loss):.3f}")
    model.eval()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean())
    print(f"{args.method} on timm resnet10t: test acc {acc:.3f}")


if __name__ == "__main__":
    main()
