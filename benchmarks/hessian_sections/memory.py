"""Section 4: bounded memory (flatminima only), what capping the Lanczos basis costs. The top 5
eigenvalues with ``max_basis`` (thick restart) against the unbounded basis, and the SLQ density
without reorthogonalization (two vectors held) against full reorthogonalization.

``benchmarks/hessian.py --only memory`` measures it on its own and merges it into the stored
results.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from _fixtures import OurCounter, clock, med, reference_top

import flatminima.hessian as fh


def bench_memory(model, batch, seeds: list[int], caps: list[int], steps: int) -> dict:
    """Top 5 with a capped basis (thick restart) and SLQ with and without reorthogonalization."""
    ref = reference_top(model, batch, 5)
    n = sum(p.numel() for p in model.parameters())
    out: dict = {"reference": ref.tolist(), "params": n, "eigen": [], "density": {}}
    for cap in [None, *caps]:
        for seed in seeds:
            with OurCounter() as c:
                t0 = clock()
                got = fh.eigenvalues(model, F.cross_entropy, batch, k=5, tol=1e-3,
                                     max_basis=cap if cap else 10_000,
                                     generator=torch.Generator().manual_seed(seed)).double()
                sec = clock() - t0
            out["eigen"].append({"max_basis": cap, "seed": seed, "matvecs": c.calls, "s": sec,
                                 "rel_err": float(((got - ref).abs() / ref.abs()).max())})
            print(f"  top 5, max_basis={cap}, seed {seed}: {c.calls} products, {sec:.2f} s",
                  flush=True)
    dens = {}
    for reorth in (True, False):
        t0 = clock()
        nodes, weights = fh.density_nodes(model, F.cross_entropy, batch, num_steps=steps,
                                          generator=torch.Generator().manual_seed(0),
                                          reorthogonalize=reorth)
        dens[reorth] = (nodes, weights)
        out["density"]["reorth" if reorth else "none"] = {
            "s": clock() - t0, "vectors_held": steps if reorth else 2,
            "copies_of_top": int(((nodes[0] - ref[0]).abs() < 1e-4 * ref[0]).sum())}
    lo = min(float(d[0].min()) for d in dens.values())
    hi = max(float(d[0].max()) for d in dens.values())
    sigma = 0.01 * (hi - lo)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, 2000, dtype=torch.float64)

    def smooth(nodes, weights):
        k = torch.exp(-0.5 * ((grid[:, None] - nodes[0][None]) / sigma) ** 2)
        return (k * weights[0][None]).sum(1) / (sigma * math.sqrt(2 * math.pi))

    a, b = smooth(*dens[True]), smooth(*dens[False])
    out["density"]["l1_distance"] = float(torch.trapezoid((a - b).abs(), grid))
    moments = {}
    for p in range(1, 5):
        m_r = float((dens[True][1][0] * dens[True][0][0] ** p).sum())
        m_n = float((dens[False][1][0] * dens[False][0][0] ** p).sum())
        moments[p] = abs(m_n - m_r) / abs(m_r)
    out["density"]["moment_rel_diff"] = moments
    out["density"]["steps"] = steps
    print(f"  density: {out['density']}", flush=True)
    return out


def report(mem: dict) -> list[str]:
    n, ref = mem["params"], mem["reference"]
    lines = [
        f"## 4. Bounded memory (CNN, {n} parameters, one batch)",
        "",
        f"Measured on {mem.get('date', 'the date above')} with the same models and data.",
        "",
        "Top 5 eigenvalues to 1e-3 (guaranteed residual rule) with the Lanczos basis capped at "
        "`max_basis` vectors (thick restart) against an unbounded basis; median over "
        f"{len({r['seed'] for r in mem['eigen']})} start vectors. Reference: "
        + ", ".join(f"{v:.6g}" for v in ref) + ".",
        "",
        "| max_basis | vectors held (MB here; GB for 36.5M parameters) | products | CPU time (s) "
        "| max rel. error |",
        "|---|---|---|---|---|",
    ]
    caps = list(dict.fromkeys(r["max_basis"] for r in mem["eigen"]))
    for cap in caps:
        rows = [r for r in mem["eigen"] if r["max_basis"] == cap]
        held = max(r["matvecs"] for r in rows) if cap is None else cap
        label = "unbounded" if cap is None else str(cap)
        lines.append(
            f"| {label} | {held} ({held * n * 4 / 1e6:.1f} MB; {held * 36.5e6 * 4 / 1e9:.1f} "
            f"GB) | {med(rows, 'matvecs'):.0f} | {med(rows, 's'):.2f} | "
            f"{med(rows, 'rel_err'):.1e} |")
    d = mem["density"]
    mom = ", ".join(f"p={p}: {v:.1e}" for p, v in d["moment_rel_diff"].items())
    lines += [
        "",
        f"SLQ density, {d['steps']} Lanczos steps (as many products either way), one start "
        f"vector: full reorthogonalization holds {d['steps']} vectors ({d['reorth']['s']:.2f} s "
        f"of CPU time), the bare recurrence 2 ({d['none']['s']:.2f} s). Without "
        f"reorthogonalization the nodes hold {d['none']['copies_of_top']} copies of the top "
        f"eigenvalue (with: {d['reorth']['copies_of_top']}; copies share its weight); the "
        f"smoothed "
        f"densities differ by {d['l1_distance']:.1e} in L1 (each integrates to 1) and the "
        f"quadrature moments sum tau theta^p by {mom} (relative).",
        "",
    ]
    return lines
