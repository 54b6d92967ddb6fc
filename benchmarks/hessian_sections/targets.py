"""The project's two targets, checked against the stored results of every section: the top
eigenvalue to 1e-3 at least 3x faster than PyHessian, and a trace estimate with at most half
Hutchinson's error at the same number of products.
"""

from __future__ import annotations

import statistics

from _fixtures import med

from hessian_sections.cifar import CIFAR_SCENARIOS
from hessian_sections.eigen import SCENARIOS, floor_bounds


def report(res: dict) -> list[str]:
    """The project's two targets, checked against the numbers above."""
    out = ["## Targets", ""]
    cifar = res.get("cifar") or {}
    sections = [(title, res.get(key)) for key, title in SCENARIOS]
    sections += [(title, cifar.get(key)) for key, title in CIFAR_SCENARIOS]
    for title, entry in sections:
        rows = (entry or {}).get("runs", [])
        if not rows or "pyh_s" not in rows[0]:
            continue
        name = title.split(". ", 1)[1]
        own = statistics.median(r["pyh_s"] / r["ours_s"] for r in rows)
        missed = sum(r["pyh_rel_err"] > 1e-3 for r in rows)
        ok = [r for r in rows if r.get("pyh_oracle_s") and r.get("ours_oracle_s")]
        if ok:
            prod = statistics.median(r["pyh_oracle_matvecs"] / r["ours_oracle_matvecs"]
                                     for r in ok)
            cpu = statistics.median(r["pyh_oracle_s"] / r["ours_oracle_s"] for r in ok)
            verdict = "met" if min(cpu, own) >= 3 else "not met"
            bounds = floor_bounds(entry)
            if verdict == "not met" and bounds is not None:
                best = min(bounds)
                verdict += (f"; out of reach for any method (the floor allows {best:.1f}x)"
                            if best < 3 else f" (the floor allows {best:.1f}x)")
            out.append(
                f"- {name}: PyHessian needs {prod:.1f}x the products to reach 1e-3; CPU time "
                f"ratio {cpu:.1f}x at the oracle stop and {own:.1f}x at each library's own "
                f"stopping rule (PyHessian's own rule missed 1e-3 on {missed} of {len(rows)} "
                f"starts). Target 3x: **{verdict}**.")
        else:
            verdict = "met" if own >= 3 else "not met"
            out.append(
                f"- {name}: CPU time ratio {own:.1f}x at each library's own stopping rule "
                f"(PyHessian missed 1e-3 on {missed} of {len(rows)} starts). Target 3x: "
                f"**{verdict}**.")
    if "eigen_k5" in res and "eigen_k1" in res:
        top = res["eigen_k5"]["reference"]
        rows = res["eigen_k1"]["runs"]
        random_oracle = (f", {med(rows, 'ours_random_oracle_matvecs'):.0f} from a random start"
                         if "ours_random_oracle_matvecs" in rows[0] else "")
        out.append(
            f"- Where 3x is not reached for one top eigenvalue of all parameters: the top "
            f"eigenvalue is well separated ({top[0]:.3g} against {top[1]:.3g} next, ratio "
            f"{top[1] / top[0]:.2f}), so power iteration is within 1e-3 after "
            f"{med(rows, 'pyh_oracle_matvecs'):.0f} products and Lanczos after "
            f"{med(rows, 'ours_oracle_matvecs'):.0f} from the default start (the gradient "
            f"added to a random vector){random_oracle}; the guaranteed stopping rule takes "
            f"one or two products more. A product is a double-backward through the same "
            f"network in both libraries ({res['hvp']['double_backward_kept_ms']:.0f} ms "
            f"against PyHessian's {res['hvp'].get('pyhessian_hvp_ms', float('nan')):.0f} ms in "
            f"section 1: flatminima folds eval-mode BatchNorm into the layer before it, skips "
            f"the data's second-order gradient in the first convolution and the zero tensors "
            f"of ReLU and max-pooling), and both pay for one graph build "
            f"({res['hvp'].get('graph_build_ms', float('nan')):.0f} ms), so on one batch the "
            f"time ratio is at most about the product ratio times the count ratio. Over "
            f"several batches flatminima also keeps the graphs where PyHessian rebuilds them "
            f"for every product, and the 3x is reached; it is reached as well where the "
            f"products differ in number or in cost: several eigenvalues at once, and a last "
            f"layer over several batches. The floor under each section bounds what any method "
            f"could reach on the same model and data.")
    for m, b in res["trace"]["budgets"].items():
        ref = b["hutchinson_expected"]["rms_rel_err"]
        pp, kr = b["hutch++"]["rms_rel_err"] / ref, b["krylov"]["rms_rel_err"] / ref
        out.append(
            f"- Trace, {m} products: error / Hutchinson's = {pp:.2f} for Hutch++ "
            f"(**{'met' if pp <= 0.5 else 'not met'}**), {kr:.2f} for krylov "
            f"(**{'met' if kr <= 0.5 else 'not met'}**); target <= 0.5.")
    out.append("")
    return out
