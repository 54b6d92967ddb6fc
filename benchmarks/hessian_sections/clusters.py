"""Section 2g: the top 5 eigenvalues where they crowd (an untrained CNN, all parameters, one
batch): how often a run of each library returns a wrong fifth value, with one start vector and
with ``starts=2``.

``benchmarks/hessian.py --only clusters`` measures it on its own and merges it into the stored
results.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from _fixtures import OurCounter, clock, cnn, reference_top

import flatminima.hessian as fh
from hessian_sections.pyhessian_adapter import Counter, pyhessian, pyhessian_for


def bench_clusters(model, batch, k: int, seeds: list[int], pyh_seeds: list[int]) -> dict:
    """Top-k eigenvalues where they crowd (an untrained CNN): how often each library returns a
    wrong k-th value. Lanczos's stopping rule bounds each value's distance to *an* eigenvalue but
    cannot see one the start vector has barely touched; ``starts=2`` merges two runs."""
    # The reference: k + 3 values to residual 1e-9 from two starts (runs of 100+ products see
    # every eigenvalue of the cluster), checked to agree with a third start.
    ref = fh.eigenvalues(model, F.cross_entropy, batch, k=k + 3, tol=1e-9, max_iter=400,
                         starts=2, generator=torch.Generator().manual_seed(1234)).double()
    check = reference_top(model, batch, k + 3)
    out = {"reference": ref[:k].tolist(), "next": ref[k:].tolist(),
           "reference_agreement": float(((ref - check).abs() / ref.abs()).max()), "runs": []}
    ref = ref[:k]

    def rel(vals) -> float:
        got = torch.sort(torch.as_tensor(vals, dtype=torch.float64), descending=True).values
        return float(((got - ref).abs() / ref.abs()).max())

    for starts in (1, 2):
        for seed in seeds:
            with OurCounter() as c:
                t0 = clock()
                vals = fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-3,
                                      starts=starts, generator=torch.Generator().manual_seed(seed))
                secs = clock() - t0
            out["runs"].append({"library": f"flatminima starts={starts}", "seed": seed,
                                "matvecs": c.calls, "s": secs, "rel_err": rel(vals),
                                "values": vals.tolist()})
            print(f"  clusters starts={starts} seed {seed}: {out['runs'][-1]}", flush=True)
    if pyhessian is not None:
        for seed in pyh_seeds:
            torch.manual_seed(seed)
            with Counter() as c:
                t0 = clock()
                vals, _ = pyhessian_for(model, batch).eigenvalues(maxIter=100, tol=1e-3, top_n=k)
                secs = clock() - t0
            out["runs"].append({"library": "PyHessian", "seed": seed, "matvecs": c.calls,
                                "s": secs, "rel_err": rel(vals), "values": list(vals)})
            print(f"  clusters PyHessian seed {seed}: {out['runs'][-1]}", flush=True)
    return out


def run_clusters(batch, quick: bool = False) -> dict:
    """The section on an untrained CNN (seeded; eval mode, BatchNorm at its initial statistics)."""
    torch.manual_seed(0)
    model = cnn().eval()
    seeds = list(range(4 if quick else 8))
    return bench_clusters(model, batch, 5, seeds, [0] if quick else [0, 1])


def report(cl: dict | None) -> list[str]:
    if not cl:
        return []
    ref = ", ".join(f"{v:.4g}" for v in cl["reference"])
    nxt = ", ".join(f"{v:.4g}" for v in cl["next"])
    lines = [
        f"## 2g. Top {len(cl['reference'])} eigenvalues where they crowd (untrained CNN, all "
        "parameters, one batch)",
        "",
        f"Reference (Lanczos to residual 1e-9, two starts; a third start agrees to "
        f"{cl['reference_agreement']:.1e}): {ref}; next: {nxt}. "
        + (f"Measured {cl['date']}. " if cl.get("date") else "") +
        "A run *misses* when its largest "
        "relative error exceeds 1e-3: it returned a value of the next eigenvalue in place of one "
        "of the cluster (or, for PyHessian, stopped before converging).",
        "",
        "| library | start vectors | misses | products (median) | CPU time (s, median) | "
        "max rel. error |",
        "|---|---|---|---|---|---|",
    ]
    for lib in dict.fromkeys(r["library"] for r in cl["runs"]):
        rows = [r for r in cl["runs"] if r["library"] == lib]
        misses = sum(r["rel_err"] > 1e-3 for r in rows)
        lines.append(
            f"| {lib} | {len(rows)} | {misses} of {len(rows)} | "
            f"{statistics.median(r['matvecs'] for r in rows):g} | "
            f"{statistics.median(r['s'] for r in rows):.3g} | "
            f"{max(r['rel_err'] for r in rows):.1e} |")
    lines += [
        "",
        "Every value flatminima returns is within 1e-3 of *an* eigenvalue (the residual rule) and "
        "at most the eigenvalue of its rank (Cauchy interlacing), so a miss is always downwards, "
        "to the next eigenvalue; no Krylov method can certify that none was skipped. "
        "`starts=2` runs twice and keeps the larger value at each rank (twice the products).",
        "",
    ]
    return lines
