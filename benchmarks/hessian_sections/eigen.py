"""Section 2a-2f: the top eigenvalue (and the top 5) to 1e-3 relative error, flatminima's
Lanczos against PyHessian's power iteration.

For each start vector: wall time and products of ``fm.hessian.eigenvalues`` (Lanczos, residual
stopping rule ``tol=1e-3``, from its default start and from a random one) and of PyHessian's
``hessian.eigenvalues`` (power iteration, its default ``tol=1e-3``), and for both the first
product count at which the running estimate is within 1e-3 of the reference (an oracle stop).
The reference is a Lanczos run to residual 1e-9 (a guaranteed bound). The floors (one forward
pass, one gradient) bound what any method could reach on the same model and data.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from _fixtures import OurCounter, clock, med, reference_top, timed

import flatminima.hessian as fh
from flatminima._params import last_layer_names
from flatminima.hessian._eigen import start_vector
from flatminima.hessian._lanczos import lanczos
from flatminima.hessian._operator import CurvatureOperator
from hessian_sections.pyhessian_adapter import Counter, only_trainable, pyhessian, pyhessian_for

SCENARIOS = (
    ("eigen_k1", "2a. Top eigenvalue, CNN, all parameters, one batch"),
    ("eigen_last", "2b. Top eigenvalue, CNN, last layer only (the NRS paper's Table 3 measure), "
                   "one batch"),
    ("eigen_mlp", "2c. Top eigenvalue, MLP, all parameters, one batch"),
    ("eigen_ds", "2d. Top eigenvalue, CNN, all parameters, several batches"),
    ("eigen_ds_last", "2e. Top eigenvalue, CNN, last layer only, several batches"),
    ("eigen_k5", "2f. Top 5 eigenvalues, CNN, all parameters, one batch"),
)


def first_within(values: list[tuple[int, float, float]], ref: float, rtol: float):
    """First (count, seconds) after which every estimate is within rtol of ref."""
    hit = None
    for count, secs, val in values:
        if abs(val - ref) <= rtol * abs(ref):
            hit = hit or (count, secs)
        else:
            hit = None
    return hit


def floor_times(model, data, names: list[str] | None, repeats: int = 5) -> dict:
    """CPU seconds of one forward pass (which no method can skip) and one gradient, on the
    same model and data.

    ``forward_s``: one forward pass over the data (every method reads it through the network).
    ``gradient_s``: one gradient of the size-weighted mean loss with respect to the measured
    parameters (forward and backward), for scale: a Hessian-vector product differentiates
    through that computation once more.
    """
    batches = data if isinstance(data, list) else [data]
    total = sum(len(y) for _, y in batches)
    chosen = [p for n, p in model.named_parameters() if names is None or n in names]

    def forward() -> None:
        with torch.no_grad():
            for x, _ in batches:
                model(x)

    def gradient() -> None:
        with only_trainable(model, names):
            loss = sum(len(y) / total * F.cross_entropy(model(x), y) for x, y in batches)
            torch.autograd.grad(loss, chosen)

    forward(), gradient()  # warm up
    return {"forward_s": timed(forward, repeats), "gradient_s": timed(gradient, repeats)}


def bench_eigen(model, batch, seeds: list[int], k: int, pyh_iter: int, params=None,
                oracle: bool = True, floors: bool = True) -> dict:
    ref = reference_top(model, batch, k, params)
    names = last_layer_names(model) if params == "last_layer" else None
    rows = []
    for seed in seeds:
        row = {"seed": seed}

        def run_ours(row: dict = row, seed: int = seed) -> None:
            # flatminima, its own stopping rule
            with OurCounter() as c:
                t0 = clock()
                ours = fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-3, params=params,
                                      generator=torch.Generator().manual_seed(seed)).double()
                row["ours_s"] = clock() - t0
            row["ours_matvecs"] = c.calls
            row["ours_rel_err"] = float(((ours - ref).abs() / ref.abs()).max())
            if k != 1:   # the default start is the random one: nothing more to compare
                return
            # flatminima from a Rademacher start alone (the default for k=1 adds the gradient)
            with OurCounter() as c:
                t0 = clock()
                plain = fh.eigenvalues(model, F.cross_entropy, batch, k=k, tol=1e-3,
                                       params=params, start="random",
                                       generator=torch.Generator().manual_seed(seed)).double()
                row["ours_random_s"] = clock() - t0
            row["ours_random_matvecs"] = c.calls
            row["ours_random_rel_err"] = float(((plain - ref).abs() / ref.abs()).max())
            # flatminima, oracle stop: first Lanczos step with the top Ritz value within 1e-3,
            # from each run's start vector (its trajectory up to that run's stop contains it)
            for key, kind in (("ours", "gradient"), ("ours_random", "random")):
                if not oracle:
                    break
                t0 = clock()
                op = CurvatureOperator(model, F.cross_entropy, batch, params)
                hist = []

                def cb(step, ritz, _res, hist=hist, t0=t0):
                    hist.append((step, clock() - t0, float(ritz.max())))

                start = start_vector(op, kind, torch.Generator().manual_seed(seed))
                lanczos(op.matvec, start, row[f"{key}_matvecs"], tol=None, callback=cb)
                hit = first_within(hist, float(ref[0]), 1e-3)
                row[f"{key}_oracle_matvecs"], row[f"{key}_oracle_s"] = hit if hit else (None, None)

        def run_pyhessian(row: dict = row, seed: int = seed) -> None:
            torch.manual_seed(seed)
            with Counter() as c, only_trainable(model, names):
                t0 = clock()
                hc = pyhessian_for(model, batch)
                vals, _ = hc.eigenvalues(maxIter=100, tol=1e-3, top_n=k)
                row["pyh_s"] = clock() - t0
            row["pyh_matvecs"] = c.calls
            got = torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)
            row["pyh_rel_err"] = float(((got - ref).abs() / ref.abs()).max())
            if k == 1 and oracle:
                torch.manual_seed(seed)
                with (Counter(record=True, stop_at=(float(ref[0]), 1e-3)) as c,
                      only_trainable(model, names)):
                    hc = pyhessian_for(model, batch)
                    hc.eigenvalues(maxIter=pyh_iter, tol=0.0, top_n=1)
                hit = first_within(c.trace, float(ref[0]), 1e-3)
                row["pyh_oracle_matvecs"], row["pyh_oracle_s"] = hit if hit else (None, None)

        # Alternate which library goes first: on a shared machine the first of two runs can
        # be systematically slower or faster (caches, allocator, neighbours).
        order = [run_ours, run_pyhessian] if seed % 2 == 0 else [run_pyhessian, run_ours]
        for run in order:
            if run is run_ours or pyhessian is not None:
                run()
        rows.append(row)
        print(f"  k={k} seed {seed}: " + ", ".join(
            f"{key}={val:.4g}" if isinstance(val, float) else f"{key}={val}"
            for key, val in row.items() if key != "seed"), flush=True)
    floor = floor_times(model, batch, names) if k == 1 and floors else {}
    return {"reference": ref.tolist(), "runs": rows, "floors": floor}


def report(res: dict) -> list[str]:
    """Sections 2a-2f, each scenario the results hold."""
    lines = [
        "Where the time goes in sections 2d-2e: flatminima keeps the gradient graph of every "
        "batch when all of them fit a quarter of the available memory (PyHessian's dataloader "
        "mode rebuilds forward, backward and graph for every batch and product), and for a "
        "parameter subset owned by the output module (the last layer) it computes that "
        "module's inputs once and runs every product through it alone (checked to be exact; "
        "`flatminima/hessian/_trunk.py`).",
        "",
    ]
    return lines + scenario_reports(res, SCENARIOS)


def scenario_reports(res: dict, scenarios) -> list[str]:
    """:func:`eigen_report` of each ``(key, title)`` of ``scenarios`` that ``res`` holds."""
    return [line for key, title in scenarios if key in res
            for line in eigen_report(res[key], title)]


def table_row(rows: list[dict], method: str, rule: str, key: str, err: str | None = None
              ) -> str:
    """One method's row of an :func:`eigen_report` table: medians over the start vectors of
    ``<key>_matvecs``, ``<key>_s`` and ``<key>_rel_err`` (``err``, if given, in place of it)."""
    err = f"{med(rows, f'{key}_rel_err'):.1e}" if err is None else err
    return (f"| {method} | {rule} | {med(rows, f'{key}_matvecs'):.0f} | "
            f"{med(rows, f'{key}_s'):.3g} | {err} |")


def eigen_report(e: dict, title: str) -> list[str]:
    """One top-eigenvalue section (table, speed-ups, floors)."""
    lines: list[str] = []
    rows = e["runs"]
    one = len(e["reference"]) == 1
    guaranteed, oracle = "residual <= 1e-3 * theta (guaranteed)", "oracle: first step within 1e-3"
    random = "flatminima Lanczos, `start=\"random\"`"
    lines += [
        f"## {title}: to 1e-3 relative error (median over {len(rows)} start vectors)",
        "",
        "Reference (Lanczos to residual 1e-9): "
        + ", ".join(f"{v:.6g}" for v in e["reference"]),
        "",
        "| method | stopping rule | Hessian-vector products | CPU time (s) | max rel. error |",
        "|---|---|---|---|---|",
        table_row(rows, "flatminima Lanczos"
                  + (" (default: gradient start)" if "ours_random_s" in rows[0] else ""),
                  guaranteed, "ours"),
    ]
    if "ours_random_s" in rows[0]:
        lines.append(table_row(rows, random, guaranteed, "ours_random"))
    if "pyh_s" in rows[0]:
        rule = ("relative change < 1e-3 (default), deflation for each further eigenvalue"
                if not one else "relative change < 1e-3 (default)")
        lines.append(table_row(rows, "PyHessian power iteration", rule, "pyh"))
    if one and "ours_oracle_s" in rows[0]:
        label = "flatminima Lanczos" + (" (gradient start)" if "ours_random_s" in rows[0] else "")
        lines.append(table_row(rows, label, oracle, "ours_oracle", "<= 1e-3"))
        if "ours_random_oracle_s" in rows[0]:
            lines.append(table_row(rows, random, oracle, "ours_random_oracle", "<= 1e-3"))
        if "pyh_oracle_s" in rows[0]:
            lines.append(table_row(rows, "PyHessian power iteration", oracle, "pyh_oracle",
                                   "<= 1e-3"))
    if "pyh_s" in rows[0]:
        speed = [r["pyh_s"] / r["ours_s"] for r in rows]
        lines += ["", f"Speed-up at each library's own stopping rule: median "
                  f"{statistics.median(speed):.1f}x (per start vector: "
                  f"{', '.join(f'{s:.1f}x' for s in speed)})."]
        if "ours_random_s" in rows[0]:
            plain = [r["pyh_s"] / r["ours_random_s"] for r in rows]
            lines[-1] += (f" From a random start: median {statistics.median(plain):.1f}x "
                          f"({', '.join(f'{s:.1f}x' for s in plain)}).")
        if one:
            ok = [r for r in rows if r.get("pyh_oracle_s") and r.get("ours_oracle_s")]
            if ok:
                sp = [r["pyh_oracle_s"] / r["ours_oracle_s"] for r in ok]
                lines.append(f"Speed-up at the oracle stop: median "
                             f"{statistics.median(sp):.1f}x.")
        if one and e.get("floors"):
            lines += ["", floor_sentence(e)]
    lines.append("")
    return lines


def floor_bounds(e: dict) -> tuple[float, float] | None:
    """Best possible speed-ups over PyHessian (own rule, oracle stop) of any method: PyHessian's
    time over one forward pass through the data, which no method can skip; medians."""
    fl, rows = e.get("floors"), e["runs"]
    if not fl or "pyh_s" not in rows[0]:
        return None
    own = statistics.median(r["pyh_s"] for r in rows) / fl["forward_s"]
    orc = [r["pyh_oracle_s"] for r in rows if r.get("pyh_oracle_s")]
    return own, statistics.median(orc) / fl["forward_s"] if orc else float("nan")


def floor_sentence(e: dict) -> str:
    fl, rows = e["floors"], e["runs"]
    bounds = floor_bounds(e)
    if bounds is None:
        return ""
    own, orc = bounds
    text = (f"Floors: every method reads the data through the network at least once; one "
            f"forward pass takes {fl['forward_s']:.3f} s (one gradient {fl['gradient_s']:.3f} "
            f"s), so no method can be more than {own:.1f}x faster than PyHessian at its own "
            f"stopping rule or {orc:.1f}x at the oracle stop.")
    key = "ours_random" if "ours_random_oracle_matvecs" in rows[0] else "ours"
    ok = [r for r in rows if r.get("pyh_oracle_matvecs") and r.get(f"{key}_oracle_matvecs")]
    if ok:
        ratio = statistics.median(r["pyh_oracle_matvecs"] / r[f"{key}_oracle_matvecs"]
                                  for r in ok)
        text += (
            " And from the same random start vector no method that builds its estimate from "
            "products with that vector's Krylov space (power iteration, Lanczos) can reach 1e-3 "
            "in fewer products than Lanczos's oracle count: its top Ritz value is the largest "
            "Rayleigh quotient over that space, where every power-iteration estimate lies. With "
            f"products of equal cost that caps the gain over PyHessian's power iteration at "
            f"{ratio:.1f}x (products at the oracle stop); the rest has to come from a cheaper "
            "product or a better start vector.")
    return text
