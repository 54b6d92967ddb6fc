"""Section 2j: start vectors. Lanczos to 1e-3 from a Rademacher start and from the gradient
start (the default for ``k=1``), on the trained CNN and on the untrained one of section 2g, for
the top eigenvalue and the top 5: products and misses.

``benchmarks/hessian.py --only start`` measures it on its own and merges it into the stored
results (265 s of wall time on 2 CPU cores in the stored run).
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from _fixtures import OurCounter, cnn

import flatminima.hessian as fh


def bench_start(cases: dict, seeds: list[int]) -> dict:
    """Lanczos to 1e-3 from a Rademacher start and from the gradient start (the default for
    k=1) on the same seeds: products and misses (largest relative error above 1e-3) for each
    ``(model, data, k)`` case."""
    out = {}
    for name, (model, data, k) in cases.items():
        ref = fh.eigenvalues(model, F.cross_entropy, data, k=k + 3, tol=1e-9, max_iter=400,
                             starts=2, generator=torch.Generator().manual_seed(1234))[:k].double()
        entry = {"k": k, "reference": ref.tolist()}
        for start in ("random", "gradient"):
            runs = []
            for seed in seeds:
                with OurCounter() as c:
                    vals = fh.eigenvalues(model, F.cross_entropy, data, k=k, tol=1e-3,
                                          start=start,
                                          generator=torch.Generator().manual_seed(seed))
                err = float(((vals.double() - ref).abs() / ref.abs()).max())
                runs.append({"seed": seed, "matvecs": c.calls, "rel_err": err})
            entry[start] = runs
            print(f"  start {name} {start}: products "
                  f"{[r['matvecs'] for r in runs]}, misses "
                  f"{sum(r['rel_err'] > 1e-3 for r in runs)}", flush=True)
        out[name] = entry
    return out


def run_start(batch, model_cnn, quick: bool = False) -> dict:
    """The start-vector section: the trained CNN and the untrained one of section 2g."""
    torch.manual_seed(0)
    raw = cnn().eval()
    cases = {"trained CNN, k=1": (model_cnn, batch, 1),
             "trained CNN, k=5": (model_cnn, batch, 5),
             "untrained CNN, k=1": (raw, batch, 1),
             "untrained CNN, k=5": (raw, batch, 5)}
    return bench_start(cases, list(range(4 if quick else 8)))


def report(st: dict | None) -> list[str]:
    if not st:
        return []
    lines = [
        "## 2j. Start vectors: a random one against the gradient start",
        "",
        "Lanczos to 1e-3 (guaranteed residual rule) on one batch, all parameters, from the same "
        "seeds: a Rademacher vector (`start=\"random\"`) and that vector plus the loss "
        "gradient at half its length (`start=\"gradient\"`, the default for `k=1`). A run "
        "misses when its largest relative error exceeds 1e-3 (a skipped eigenvalue)."
        + (f" Measured {st['date']}." if "date" in st else ""),
        "",
        "| model, k | start | products (median, range) | misses | max rel. error |",
        "|---|---|---|---|---|",
    ]
    for name, e in st.items():
        if not isinstance(e, dict):
            continue
        for start in ("random", "gradient"):
            runs = e[start]
            counts = [r["matvecs"] for r in runs]
            misses = sum(r["rel_err"] > 1e-3 for r in runs)
            lines.append(
                f"| {name} | {start} | {statistics.median(counts):.0f} ({min(counts)}-"
                f"{max(counts)}) | {misses} of {len(runs)} | "
                f"{max(r['rel_err'] for r in runs):.1e} |")
    lines += [
        "",
        "The gradient of a trained network lies mostly in its top eigenspace (Gur-Ari et al. "
        "2018), so the start leans towards the top eigenvector and the single top eigenvalue "
        "converges in fewer products; for several eigenvalues it favours some of them, which "
        "can then converge before an unfavoured one has appeared, so `start=\"auto\"` uses it "
        "for `k=1` only.",
        "",
    ]
    return lines
