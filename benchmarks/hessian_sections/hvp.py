"""Section 1: the cost of one Hessian-vector product by each strategy, on the MNIST CNN.

Double-backward with the gradient graph kept (with each of flatminima's exact rewrites switched
off in turn: ReLU/max-pooling without zero tensors, the data's convolution without the data's
gradient, eval-mode BatchNorm folded into the layer before it), double-backward with the graph
rebuilt per product, forward-over-reverse, blocks of 8 vectors, and PyHessian's product; plus
how far each strategy's products are from the default's. This measurement decides
``mode="auto"`` in ``flatminima.hessian``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _fixtures import alternating, timed

from flatminima.hessian._operator import CurvatureOperator
from hessian_sections.pyhessian_adapter import pyh_mod, pyhessian, pyhessian_for

# Kept-graph product variants of section 1: CurvatureOperator switches, all on by default.
KEPT_VARIANTS = {
    "double_backward_kept": {},
    "double_backward_kept_no_piecewise": {"lean_piecewise": False},
    "double_backward_kept_no_data_conv": {"data_convs": False},
    "double_backward_kept_plain_torch": {"data_convs": False, "lean_piecewise": False},
    "double_backward_kept_affine_bn": {"fold_norms": False},
    "double_backward_kept_fused_bn": {"affine_norms": False},
}


def bench_hvp(model, x, y, repeats: int) -> dict:
    batch = (x, y)
    out = {}
    kept = {key: CurvatureOperator(model, F.cross_entropy, batch, mode="double_backward",
                                   cache_graph=True, **kw) for key, kw in KEPT_VARIANTS.items()}
    op_db = kept["double_backward_kept"]
    op_db_re = CurvatureOperator(model, F.cross_entropy, batch, mode="double_backward",
                                 cache_graph=False)
    op_fr = CurvatureOperator(model, F.cross_entropy, batch, mode="forward_over_reverse")
    n = op_db.size
    v = torch.randn(n)
    vs = torch.randn(8, n)
    out["graph_build_ms"] = 1e3 * timed(lambda: op_db._grad_graph(0), repeats)
    out["folds"] = len(op_db.folds)
    products = {}
    for key, op in kept.items():
        op.matvec(v)  # builds and keeps the graph
        products[key] = lambda op=op: op.matvec(v)
    if pyhessian is not None:
        hc = pyhessian_for(model, batch)
        vl = [torch.randn_like(p) for p in hc.params]
        products["pyhessian_hvp"] = lambda: pyh_mod.hessian_vector_product(hc.gradsH,
                                                                          hc.params, vl)
    # The kept-graph products differ by 5-40%: time them in alternation, twice the rounds.
    for key, secs in alternating(products, 2 * repeats).items():
        out[f"{key}_ms"] = 1e3 * secs
    out["double_backward_rebuilt_ms"] = 1e3 * timed(lambda: op_db_re.matvec(v), repeats)
    out["forward_over_reverse_ms"] = 1e3 * timed(lambda: op_fr.matvec(v), repeats)
    out["block8_double_backward_kept_ms_per_vec"] = 1e3 * timed(lambda: op_db.matmat(vs),
                                                                repeats) / 8
    out["block8_double_backward_rebuilt_ms_per_vec"] = 1e3 * timed(lambda: op_db_re.matmat(vs),
                                                                   repeats) / 8
    out["block8_forward_over_reverse_ms_per_vec"] = 1e3 * timed(lambda: op_fr.matmat(vs),
                                                                repeats) / 8
    # Equality of the strategies on this model (max relative difference).
    ref = op_db.matmat(vs)
    others = {"rebuilt": op_db_re, "forward_over_reverse": op_fr,
              **{key.removeprefix("double_backward_kept_"): op for key, op in kept.items()
                 if key != "double_backward_kept"}}
    for name, op in others.items():
        out[f"max_rel_diff_{name}"] = float((op.matmat(vs) - ref).norm() / ref.norm())
    return out


def decision(hv: dict) -> str:
    """The choice of ``mode="auto"``, in words, from the measured products."""
    kept, fr = hv["double_backward_kept_ms"], hv["forward_over_reverse_ms"]
    rebuilt = hv["double_backward_rebuilt_ms"]
    return (
        f"double-backward with the graph kept ({kept:.1f} ms) beats forward-over-reverse "
        f"({fr:.1f} ms) by {fr / kept:.1f}x once the graph is built, so it is the default, "
        f"and the graphs are kept whenever they fit in memory; rebuilding one per product "
        f"costs {rebuilt:.1f} ms against forward-over-reverse's {fr:.1f} ms."
    )


def optional_row(hv: dict, key: str, label: str) -> list[str]:
    """A table row for a measurement that older result files may lack."""
    return [f"| {label} | {hv[key]:.1f} |"] if key in hv else []


def report(res: dict) -> list[str]:
    env, hv = res["env"], res["hvp"]
    lines = [
        f"## 1. Hessian-vector product strategies (CNN, {env['cnn_params']} parameters, one "
        "batch)",
        "",
        "| strategy | CPU ms per product |",
        "|---|---|",
        f"| build the gradient graph once (forward + backward, create_graph) | "
        f"{hv['graph_build_ms']:.1f} |",
        f"| double-backward, graph kept (the default: BatchNorm folded into the "
        f"{hv.get('folds', 0)} convolution/linear layers before it, the data's convolution "
        f"without the data's gradient, ReLU and max-pooling without zero tensors) | "
        f"{hv['double_backward_kept_ms']:.1f} |",
        *optional_row(hv, "double_backward_kept_no_piecewise_ms",
                      "the same, ReLU and max-pooling through PyTorch's double-backward"),
        *optional_row(hv, "double_backward_kept_no_data_conv_ms",
                      "the same, the data's convolution through PyTorch's double-backward"),
        *optional_row(hv, "double_backward_kept_plain_torch_ms",
                      "the same, both through PyTorch's double-backward"),
        *optional_row(hv, "double_backward_kept_affine_bn_ms",
                      "the default with BatchNorm as an affine map x*s+t, not folded"),
        *optional_row(hv, "double_backward_kept_fused_bn_ms",
                      "the default with BatchNorm through its fused kernel"),
        f"| double-backward, graph rebuilt per product | {hv['double_backward_rebuilt_ms']:.1f} |",
        f"| forward-over-reverse (torch.func.jvp of grad) | {hv['forward_over_reverse_ms']:.1f} |",
        f"| block of 8, double-backward kept (is_grads_batched) | "
        f"{hv['block8_double_backward_kept_ms_per_vec']:.1f} |",
        f"| block of 8, double-backward rebuilt | "
        f"{hv['block8_double_backward_rebuilt_ms_per_vec']:.1f} |",
        f"| block of 8, forward-over-reverse (vmap) | "
        f"{hv['block8_forward_over_reverse_ms_per_vec']:.1f} |",
    ]
    if "pyhessian_hvp_ms" in hv:
        lines.append(f"| PyHessian's product (graph kept) | {hv['pyhessian_hvp_ms']:.1f} |")
    agree = max(v for k, v in hv.items() if k.startswith("max_rel_diff_"))
    return [
        *lines,
        "",
        f"All strategies agree (max relative difference {agree:.1e}). Decision for "
        f"`mode=\"auto\"`: {res['decision']}",
        "",
    ]
