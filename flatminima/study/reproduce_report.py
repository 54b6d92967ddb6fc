"""The report of a reproduced protocol: tables with the paper's numbers, verdicts, figures.

Every table gives mean ± std over seeds of the selected setting of each method, the paper's
number beside ours where our copy of the paper has it, and ends with a verdict in plain words:
whether a method beats the tuned Baseline by more than the seed spread, matches it or loses, and
whether its minima are flatter (where curvature was measured). A run whose models end underfit
(train accuracy below :data:`FIT_THRESHOLD`) or whose learning rate sits at the edge of its grid
is said so, since it then says little about flat minima.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flatminima.experiment import report as rep
from flatminima.experiment.checkpoint import atomic_write_text
from flatminima.study.protocol import Protocol

FIT_THRESHOLD = 95.0   # final train accuracy (%) below which a run counts as underfit
MEASURE_NAMES = {"hessian_top": "top Hessian eig", "hessian_top_last_layer": "last-layer eig",
                 "hessian_trace": "Hessian trace", "divergence": "model divergence"}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _fmt(values: Sequence[float]) -> str:
    """Mean ± std over seeds; one finite value is printed alone (a std of 0 would claim a
    spread that was never measured)."""
    m, s = _mean_std(values)
    if not math.isfinite(m):
        return "n/a"
    spec = ".2f" if abs(m) >= 0.01 else ".2e"
    if sum(math.isfinite(x) for x in values) == 1:
        return format(m, spec)
    return rep.fmt_pm(m, s, spec, missing="n/a")


def compare_to_baseline(ours: Sequence[float], base: Sequence[float]) -> str:
    """``beats`` / ``matches`` / ``loses``: the mean difference against the larger seed spread."""
    m, s = _mean_std(ours)
    bm, bs = _mean_std(base)
    if not (math.isfinite(m) and math.isfinite(bm)):
        return "n/a"
    spread = max(s, bs)
    if len(ours) < 2 or len(base) < 2:
        word = "higher than" if m > bm else "lower than" if m < bm else "equal to"
        return f"{word} (one seed: no spread)"
    if m - bm > spread:
        return "beats"
    if bm - m > spread:
        return "loses"
    return "matches"


def verdicts(best: Mapping[str, rep.SettingSummary],
             measures: Mapping[str, list[dict[str, float]]], grid: Mapping[str, list[Any]],
             reference: str = "Baseline") -> list[str]:
    """One sentence per method against the reference (the tuned Baseline), plus the regime
    warnings (underfit, a learning rate at the edge of its grid)."""
    lines = []
    base = best.get(reference)
    for label, s in best.items():
        train = s.mean("train_acc")
        if math.isfinite(train) and train < FIT_THRESHOLD:
            lines.append(f"{label} ends underfit (train accuracy {train:.1f}% < "
                         f"{FIT_THRESHOLD:g}%): this scale says nothing about its flat minima.")
        for axis, values in grid.items():
            v = s.setting.get(axis)
            if len(values) > 1 and v in (min(values), max(values)):
                lines.append(f"{label}: {axis}={v:g} is at the edge of its grid; the grid may "
                             "be too narrow for it.")
    if base is None:
        return lines
    ref = "the tuned Baseline" if reference == "Baseline" else reference
    for label, s in best.items():
        if label == reference:
            continue
        acc = compare_to_baseline(s.values.get("test_acc", []), base.values.get("test_acc", []))
        words = {"beats": f"beats {ref} by more than the seed spread",
                 "matches": f"matches {ref} (within the seed spread)",
                 "loses": f"loses to {ref} by more than the seed spread"}
        plain = "is " + acc.replace(" (", f" {ref} (", 1)  # "is lower than <ref> (one seed...)"
        sentence = f"{label} {words.get(acc, plain)} in test accuracy"
        if measures.get(label) and measures.get(reference):
            key = "hessian_top" if "hessian_top" in measures[label][0] else next(
                iter(measures[label][0]))
            ours = [m[key] for m in measures[label] if key in m]
            theirs = [m[key] for m in measures[reference] if key in m]
            flat = compare_to_baseline(ours, theirs)
            flat_words = {"beats": "sharper", "matches": "as flat", "loses": "flatter",
                          "higher than": "sharper", "lower than": "flatter",
                          "equal to": "as flat"}
            word = flat_words.get(flat.split(" (")[0], flat)
            if "(" in flat:
                word += " (one seed: no spread)"
            sentence += (f"; its minima are {word} by the "
                         f"{MEASURE_NAMES[key]} ({_fmt(ours)} vs {_fmt(theirs)})")
        lines.append(sentence + ".")
    return lines


def _table(exp: str, sr: Any, paper: Mapping[str, float],
           paper_measures: Mapping[str, Mapping[str, float]],
           measures: Mapping[tuple[str, str, str], list[dict[str, float]]],
           measure_keys: Sequence[str]) -> tuple[list[str], list[list[Any]]]:
    top5 = any(math.isfinite(v) for s in sr.best.values() for v in s.values.get("test_top5", []))
    header = ["method", "setting", "seeds", "test acc", "paper", "train acc", "gap"]
    if top5:
        header.insert(4, "test top-5")
    header += [MEASURE_NAMES[k] for k in measure_keys]
    if any(paper_measures.values()):
        header += [f"paper {MEASURE_NAMES[k]}" for k in measure_keys
                   if any(k in v for v in paper_measures.values())]
    rows = []
    for label, s in sr.best.items():
        gap = [a - b for a, b in zip(s.values.get("train_acc", []), s.values.get("test_acc", []),
                                     strict=True)]
        m = measures.get((exp, sr.search, label), [])
        row = [label, rep.describe(s.setting), len(s.seeds),
               _fmt(s.values.get("test_acc", [])) if not s.diverged
               else f"diverged ({s.diverged} of {len(s.seeds)} seeds)",
               f"{paper[label]:.2f}" if label in paper else "-",
               _fmt(s.values.get("train_acc", [])), _fmt(gap)]
        if top5:
            row.insert(4, _fmt(s.values.get("test_top5", [])))
        row += [_fmt([x[k] for x in m if k in x]) if m else "-" for k in measure_keys]
        if any(paper_measures.values()):
            row += [f"{paper_measures.get(label, {}).get(k):.2f}"
                    if k in paper_measures.get(label, {}) else "-" for k in measure_keys
                    if any(k in v for v in paper_measures.values())]
        rows.append(row)
    return header, rows


SEARCH_TITLES = {
    "fair": "fair protocol: learning rate tuned per method on the validation split, NRS "
            "controls alpha=0 and rho=0",
    "paper": "the paper's protocol: Baseline grid-searched first, the methods' own "
             "hyperparameters searched on top of the best Baseline setting",
    "grid": "every setting of the grid",
}


def write_report(out: Path, proto: Protocol, results: Mapping[str, list[Any]],
                 measures: Mapping[tuple[str, str, str], list[dict[str, float]]],
                 seeds: Sequence[int], command: str) -> str:
    """Write ``report.md``, ``results.csv``, ``results.json`` and the figures (atomically)."""
    from flatminima import plots

    lines = [f"# {proto.name}: {proto.title}", "",
             f"Paper: {proto.paper}. Measures: {proto.measures}", "",
             f"Command: `{command}`", "",
             f"Scale: **{proto.scale}** ({proto.hours.get(proto.scale, 'time not stated')}); "
             f"seeds {', '.join(map(str, seeds))}; every number is mean ± std (ddof=1) over "
             "seeds; selection on the validation split only, never on the test set.", ""]
    if proto.reduces:
        lines += [f"What this scale reduces: {proto.reduces}", ""]
    if proto.changes:
        lines += ["Settings this scale changes against the paper scale:", ""]
        lines += [f"- `{c}`" for c in proto.changes] + [""]
    if proto.notes:
        lines += ["Notes on the protocol: " + " ".join(proto.notes.split()), ""]
    csv_header: list[str] = []
    csv_rows: list[list[Any]] = []
    summary: dict[str, Any] = {}
    text = [f"{proto.name} ({proto.scale})"]
    paper_of = {e.label: e for e in proto.experiments}
    with rep.atomic_dir(out) as tmp:
        for exp_label, searches in results.items():
            lines += [f"## {exp_label}", ""]
            exp = paper_of[exp_label]
            first = next((c for sr in searches for c in sr.configs.values()), None)
            if first is not None and proto.scale != "paper":
                lines += [f"At this scale the runs are: data set `{first.dataset}`, model "
                          f"`{first.model}` {first.model_args or ''}, "
                          f"{first.subset_per_class or 'all'} training images per class, "
                          f"{first.epochs} epochs, augment `{first.augment}` (the label is the "
                          "paper's experiment this stands for).", ""]
            for sr in searches:
                header, rows = _table(exp_label, sr, exp.paper, exp.paper_measures, measures,
                                      proto.measure)
                lines += [f"### {SEARCH_TITLES[sr.search]}", ""]
                lines += [rep.markdown_table(header, rows)]
                lines += [f"- {n}" for n in sr.notes]
                meas = {label: measures.get((exp_label, sr.search, label), [])
                        for label in sr.best}
                verdict = verdicts(sr.best, meas, sr.grid_values, sr.reference)
                lines += ["", "**Verdict.** " + (" ".join(verdict) or "no Baseline to compare."),
                          ""]
                text += [f"{exp_label} [{sr.search}]", rep.text_table(header, rows)]
                text += ["verdict: " + v for v in verdict]
                csv_header = ["experiment", "search", *header]
                csv_rows += [[exp_label, sr.search, *r] for r in rows]
                slug = f"{_slug(exp_label)}_{sr.search}"
                curves = {label: [[row.get("test_acc", math.nan)
                                   for row in r.metrics.get("history", [])]
                                  for r in s.results if r.metrics.get("status") == "ok"]
                          for label, s in sr.best.items()}
                curves = {k: v for k, v in curves.items() if v and len({len(c) for c in v}) == 1}
                if curves:
                    plots.save_figure(plots.curves(curves, ylabel="test accuracy (%)",
                                                   title=f"{exp_label} ({sr.search})"),
                                      tmp / f"{slug}_curves.png")
                    lines += [f"![test accuracy over training]({slug}_curves.png)", ""]
                curv = _curvature_curves(sr)
                if curv:
                    plots.save_figure(plots.curves(curv, ylabel="top Hessian eigenvalue",
                                                   title=f"{exp_label}: curvature in training"),
                                      tmp / f"{slug}_curvature.png")
                    lines += [f"![top Hessian eigenvalue over training]({slug}_curvature.png)",
                              ""]
                summary.setdefault(exp_label, {})[sr.search] = {
                    label: {"setting": s.setting, "seeds": s.seeds,
                            **{k: s.values.get(k)
                               for k in ("test_acc", "test_top5", "val_acc", "train_acc")},
                            "measures": meas.get(label, []), "paper": exp.paper.get(label)}
                    for label, s in sr.best.items()}
                summary[exp_label][sr.search + "_verdict"] = verdict
        atomic_write_text(tmp / "report.md", "\n".join(lines).rstrip() + "\n")
        atomic_write_text(tmp / "results.csv", rep.csv_text(csv_header, csv_rows))
        atomic_write_text(tmp / "results.json", json.dumps(
            {"protocol": proto.name, "scale": proto.scale, "command": command,
             "seeds": list(seeds), "results": summary}, indent=1, default=str))
    return "\n".join(text) + f"\nreport: {out}\n"


def _curvature_curves(sr: Any) -> dict[str, list[list[float]]]:
    out = {}
    for label, s in sr.best.items():
        runs = [[row.get("hessian_top", math.nan) for row in r.metrics.get("history", [])]
                for r in s.results if r.metrics.get("status") == "ok"]
        runs = [[x for x in c if isinstance(x, int | float) and math.isfinite(x)] for c in runs]
        if runs and all(runs) and len({len(c) for c in runs}) == 1:
            out[label] = runs
    return out


def _slug(text: str) -> str:
    return "".join(c.lower() if c.isalnum() else "_" for c in text).strip("_")
