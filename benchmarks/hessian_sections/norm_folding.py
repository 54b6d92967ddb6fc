"""Section 1, BatchNorm folding on CIFAR-shaped models: product cost with eval-mode BatchNorm
folded into the layer before it, as an affine map, or through its fused kernel, on ResNet-18
and WRN-16-4 (random weights, perturbed running statistics, one batch of 32 random images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _fixtures import alternating

from flatminima.hessian._operator import CurvatureOperator


def bench_norm_folding(repeats: int) -> dict:
    """Product cost with BatchNorm folded / affine / fused on two CIFAR-shaped models (random
    weights, perturbed running statistics, one batch of 32 random images)."""
    from flatminima.hessian._eval_norm import eval_batchnorms
    from flatminima.models.registry import create_model

    out = {}
    for name, kw in (("resnet18", {}), ("wrn16_4", {"depth": 16, "widen_factor": 4})):
        torch.manual_seed(0)
        model = create_model("resnet18" if name == "resnet18" else "wrn28_10", **kw).eval()
        for bn in eval_batchnorms(model):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
        batch = (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))
        ops = {"folded": CurvatureOperator(model, F.cross_entropy, batch),
               "folded_plain_torch": CurvatureOperator(model, F.cross_entropy, batch,
                                                       data_convs=False, lean_piecewise=False),
               "affine": CurvatureOperator(model, F.cross_entropy, batch, fold_norms=False),
               "fused": CurvatureOperator(model, F.cross_entropy, batch, affine_norms=False)}
        v = torch.randn(ops["folded"].size)
        for op in ops.values():
            op.matvec(v)
        products = {k: lambda op=op, v=v: op.matvec(v) for k, op in ops.items()}
        medians = alternating(products, repeats)
        out[name] = {"params": ops["folded"].size, "norms": len(ops["affine"]._norms),
                     "folds": len(ops["folded"].folds),
                     **{f"{k}_ms": 1e3 * t for k, t in medians.items()}}
        print(f"  {name}: {out[name]}", flush=True)
    return out


def report(fold: dict | None) -> list[str]:
    if not fold:
        return []
    lines = [
        "Folding BatchNorm into the layer before it saves the elementwise work on every "
        "activation, and the data's convolution and the ReLU/max-pooling paths save a "
        "transposed convolution and two zero tensors per layer, which matter on the small CNN "
        "above; on wider CIFAR-shaped models (random weights, one batch of 32, CPU ms per "
        "product, median of 7 alternating runs) the convolutions between the layers dominate, "
        "and the differences between the variants are of the order of the spread between "
        "reruns on this shared machine (5-15%):",
        "",
        "| model | parameters | BatchNorms folded | folded | affine | fused kernel | folded, "
        "data convolution and ReLU through PyTorch's double-backward |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in fold.items():
        plain = r.get("folded_plain_torch_ms", float("nan"))
        lines.append(f"| {name} | {r['params']} | {r['folds']} of {r['norms']} | "
                     f"{r['folded_ms']:.0f} | {r['affine_ms']:.0f} | {r['fused_ms']:.0f} | "
                     f"{plain:.0f} |")
    return [*lines, ""]
