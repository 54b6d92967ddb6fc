"""Section 3: the trace at equal budgets of products, on the MLP (small enough for an exact
trace). flatminima's krylov (default), Hutch++ and Hutchinson and PyHessian's Hutchinson against
the exact trace (sum of ``e_i^T H e_i`` over all coordinates), RMS relative error over seeds,
and Hutchinson's error in closed form from the dense Hessian.
"""

from __future__ import annotations

import math
import statistics

import torch
import torch.nn.functional as F
from _fixtures import clock, hessian_rows, hutchinson_expected_rms

import flatminima.hessian as fh
from flatminima.hessian._operator import CurvatureOperator
from hessian_sections.pyhessian_adapter import pyhessian, pyhessian_for


def curvature_stats(model, batch) -> dict:
    """Exact ``tr(H)``, ``||H||_F^2`` and ``sum_i H_ii^2`` from all ``n`` rows ``H e_i``."""
    op = CurvatureOperator(model, F.cross_entropy, batch)
    trace = fro = diag_sq = 0.0
    for i, rows in hessian_rows(op):
        d = rows.diagonal(i)   # H_ii for the block's coordinates
        trace += float(d.sum())
        diag_sq += float((d * d).sum())
        fro += float((rows * rows).sum())
    return {"exact": trace, "frobenius_sq": fro, "diag_sq": diag_sq}


def bench_trace(model, batch, budgets: list[int], seeds: list[int], pyh_seeds: list[int]
                ) -> dict:
    stats = curvature_stats(model, batch)
    exact = stats["exact"]
    out = {**stats, "seeds": len(seeds), "pyh_seeds": len(pyh_seeds), "budgets": {}}
    for m in budgets:
        errs: dict[str, list[float]] = {key: [] for key in (*fh.TRACE_METHODS, "pyhessian")}
        times: dict[str, list[float]] = {key: [] for key in errs}
        for method in fh.TRACE_METHODS:
            for seed in seeds:
                t0 = clock()
                t = fh.trace(model, F.cross_entropy, batch, m, method=method,
                             generator=torch.Generator().manual_seed(seed))
                times[method].append(clock() - t0)
                errs[method].append((float(t) - exact) / exact)
        if pyhessian is not None:
            for seed in pyh_seeds:
                torch.manual_seed(seed)
                t0 = clock()
                hc = pyhessian_for(model, batch)
                samples = hc.trace(maxIter=m, tol=0.0)
                times["pyhessian"].append(clock() - t0)
                errs["pyhessian"].append((sum(samples) / len(samples) - exact) / exact)
        out["budgets"][m] = {
            key: {"rms_rel_err": math.sqrt(sum(e * e for e in v) / len(v)),
                  "median_s": statistics.median(times[key])}
            for key, v in errs.items() if v
        }
        out["budgets"][m]["hutchinson_expected"] = {
            "rms_rel_err": hutchinson_expected_rms(stats, m)}
        print(f"  trace m={m}: " + ", ".join(
            f"{key} {val['rms_rel_err']:.3g}" for key, val in out["budgets"][m].items()),
            flush=True)
    return out


def report(t: dict, mlp_params: int) -> list[str]:
    """Section 3 from ``res["trace"]``; ``mlp_params`` is the MLP's size (``res["env"]``)."""
    lines = [
        f"## 3. Trace at equal budgets (MLP, {mlp_params} parameters, one batch)",
        "",
        f"Exact trace {t['exact']:.6g} from all {mlp_params} coordinate products. RMS "
        f"relative error over {t['seeds']} seeds for flatminima's estimators and "
        f"{t['pyh_seeds']} for PyHessian's (an RMS over S seeds is itself uncertain by about "
        "1/sqrt(2S): 7% at 100 seeds); \"expected\" is Hutchinson's RMS error in closed form, "
        "sqrt(2 (||H||_F^2 - sum_i H_ii^2) / m) / tr(H), from the dense Hessian. Ratios are to "
        "that closed form.",
        "",
        "| products | krylov (default) | Hutch++ | Hutchinson (flatminima) | Hutchinson "
        "(PyHessian) | Hutchinson expected | krylov / Hutchinson | Hutch++ / Hutchinson |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, b in t["budgets"].items():
        pyh = f"{b['pyhessian']['rms_rel_err']:.3g}" if "pyhessian" in b else "n/a"
        ref = b["hutchinson_expected"]["rms_rel_err"]
        lines.append(
            f"| {m} | {b['krylov']['rms_rel_err']:.3g} | {b['hutch++']['rms_rel_err']:.3g} | "
            f"{b['hutchinson']['rms_rel_err']:.3g} | {pyh} | {ref:.3g} | "
            f"{b['krylov']['rms_rel_err'] / ref:.2f} | {b['hutch++']['rms_rel_err'] / ref:.2f} |")
    lines.append("")
    return lines
