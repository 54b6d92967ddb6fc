"""Write a study's results as a report folder: ``report.md``, PNG figures and ``results.json``.

The findings paragraph is computed from the numbers (never written in advance): which way the
generalization gap, margin, radius and log-volume move with the poison factor, and how each
method compares with Baseline as mean ± std over seeds with the difference in units of the
seed-to-seed spread.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from flatminima.experiment.report import fmt_pm  # noqa: E402
from flatminima.plots import save_figure  # noqa: E402

_METHOD_LABEL = {"baseline": "Baseline", "rpr": "RPR", "nrs": "NRS", "sam": "SAM", "nso": "NSO",
                 "asam": "ASAM", "smoothout": "SmoothOut", "adasmoothout": "AdaSmoothOut",
                 "rwp": "RWP"}


def _label(method: str) -> str:
    return _METHOD_LABEL.get(method, method)


def _ms(values: Sequence[float], fmt: str = ".3f") -> str:
    """Mean ± std (ddof=1) of the finite values; one value alone, none "n/a"."""
    return fmt_pm(_mean(values), _std(values), fmt, missing="n/a")


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _std(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")


def poison_models(res: dict[str, Any]) -> dict[float, list[dict[str, Any]]]:
    """Final Baseline models by poison factor (factor 0: the clean ones)."""
    out: dict[float, list[dict[str, Any]]] = {}
    for m in res["models"]:
        if m["method"] == "baseline":
            out.setdefault(m["poison_factor"], []).append(m)
    return dict(sorted(out.items()))


def method_models(res: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Final clean models by method, in the configured order."""
    out: dict[str, list[dict[str, Any]]] = {m: [] for m in res["config"]["methods"]}
    for m in res["models"]:
        if m["poison_factor"] == 0.0 and m["method"] in out:
            out[m["method"]].append(m)
    return out


def _basin(m: dict[str, Any], cutoff: str, key: str) -> float:
    return m["basin"][cutoff][key]


def _main_cutoff(res: dict[str, Any]) -> str:
    cutoffs = [str(c) for c in res["config"]["cutoffs"]]
    return "0.5" if "0.5" in cutoffs else cutoffs[len(cutoffs) // 2]


# -- figures --------------------------------------------------------------------------------


#: Layout of every figure: matplotlib's "compressed" layout, the constrained layout (room for
#: every title and label) made for equal-aspect axes such as the decision boundaries, whose
#: two-line titles ``tight_layout`` and the plain constrained layout push past the top edge.
#: :func:`_save` writes the figure with :func:`flatminima.plots.save_figure` (atomically, cropped
#: to what is drawn).
_LAYOUT = "compressed"


def _save(fig: plt.Figure, path: Path) -> str:
    return save_figure(fig, path, dpi=110).name


def fig_data(task: Any, path: Path) -> str:
    fig, ax = plt.subplots(1, 2, figsize=(9, 4.4), layout=_LAYOUT)
    for a, (x, y, title) in zip(ax, [(task.x_train, task.y_train, "train (and test, faint)"),
                                     (task.x_poison, task.y_poison, "poison set (unseen points)")],
                                strict=True):
        if title.startswith("train"):
            a.scatter(task.x_test[:, 0], task.x_test[:, 1], c=task.y_test, cmap="coolwarm",
                      s=6, alpha=0.25)
        a.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", s=9, edgecolors="k", linewidths=0.2)
        a.set_title(title)
        a.set_aspect("equal")
    return _save(fig, path)


def fig_boundaries(entries: list[tuple[str, dict[str, Any]]], task: Any, path: Path) -> str:
    """Decision boundaries side by side, training points on top."""
    n = len(entries)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.6), squeeze=False, layout=_LAYOUT)
    x, y = task.x_train.numpy(), task.y_train.numpy()
    for ax, (title, m) in zip(axes[0], entries, strict=True):
        g = m["grid"]
        c = np.asarray(g["coords"])
        ax.contourf(c, c, np.asarray(g["prob"]), levels=[0, 0.5, 1], colors=["#9ecae1", "#fcbba1"])
        ax.contour(c, c, np.asarray(g["prob"]), levels=[0.5], colors="k", linewidths=0.6)
        ax.scatter(x[:, 0], x[:, 1], c=np.where(y == 0, "#08519c", "#a50f15"), s=5)
        ax.set_title(f"{title}\ntrain {m['train_acc']:.1%}  test {m['test_acc']:.1%}  "
                     f"margin {m['margin_mean']:.2f}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    return _save(fig, path)


def fig_rollouts(entries: list[tuple[str, dict[str, Any]]], cutoff: float, path: Path) -> str:
    n = len(entries)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False, sharey=True,
                             layout=_LAYOUT)
    for ax, (title, m) in zip(axes[0], entries, strict=True):
        t = np.asarray(m["rollout"]["t"])
        for curve in np.asarray(m["rollout"]["loss"]):
            ax.semilogy(t, np.maximum(curve, 1e-6), lw=0.8)
        ax.axhline(cutoff, color="k", ls="--", lw=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("t (filter-normalized)")
    axes[0][0].set_ylabel("train loss")
    return _save(fig, path)


def fig_radii(entries: list[tuple[str, dict[str, Any]]], cutoff: str, path: Path) -> str:
    """Basin radius of every sampled ray (filter-normalized), one column per model."""
    fig, ax = plt.subplots(figsize=(1.2 * len(entries) + 2.0, 3.4), layout=_LAYOUT)
    gen = np.random.default_rng(0)
    for i, (_, m) in enumerate(entries):
        r = np.asarray(m["basin"][cutoff]["radii"], dtype=float)
        ax.scatter(i + gen.uniform(-0.18, 0.18, r.size), r, s=7, alpha=0.6, color=f"C{i}")
        if r.size:
            ax.hlines(np.median(r), i - 0.3, i + 0.3, color="k", lw=1.2)
    ax.set_xticks(range(len(entries)), [t for t, _ in entries], rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel(f"radius to train loss {cutoff}")
    ax.set_title("basin radius per direction (bar: median)", fontsize=9)
    return _save(fig, path)


def fig_gap_vs_poison(res: dict[str, Any], path: Path) -> str:
    pm = poison_models(res)
    factors = list(pm)
    xs = np.arange(len(factors))
    cut = _main_cutoff(res)
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6), layout=_LAYOUT)
    for key, label in (("train_acc", "train acc"), ("test_acc", "test acc"), ("gap", "gap")):
        mu = [_mean([m[key] for m in pm[f]]) for f in factors]
        sd = [_std([m[key] for m in pm[f]]) for f in factors]
        ax[0].errorbar(xs, mu, yerr=np.nan_to_num(sd), marker="o", capsize=3, label=label)
    ax[0].set_ylabel("accuracy / gap")
    ax[0].legend()
    for a, key, label in ((ax[1], "radius_mean", f"mean basin radius (cutoff {cut})"),
                          (ax[2], "log10_volume", f"log10 basin volume (cutoff {cut})")):
        mu = [_mean([_basin(m, cut, key) for m in pm[f]]) for f in factors]
        sd = [_std([_basin(m, cut, key) for m in pm[f]]) for f in factors]
        a.errorbar(xs, mu, yerr=np.nan_to_num(sd), marker="o", capsize=3)
        a.set_ylabel(label)
    for a in ax:
        a.set_xticks(xs, [f"{f:g}" for f in factors])
        a.set_xlabel("poison factor")
    return _save(fig, path)


def fig_volume_vs_gap(res: dict[str, Any], path: Path) -> str:
    cutoffs = [str(c) for c in res["config"]["cutoffs"]]
    fig, axes = plt.subplots(1, len(cutoffs), figsize=(4.2 * len(cutoffs), 3.8), squeeze=False,
                             layout=_LAYOUT)
    pm = poison_models(res)
    mm = method_models(res)
    cmap = plt.get_cmap("viridis")
    for ax, cut in zip(axes[0], cutoffs, strict=True):
        for i, (f, ms) in enumerate(pm.items()):
            ax.scatter([m["gap"] for m in ms], [_basin(m, cut, "log10_volume") for m in ms],
                       color=cmap(i / max(1, len(pm) - 1)), marker="o", s=22,
                       label=f"Baseline, poison {f:g}")
        markers = "s^vDPX*"
        for j, (meth, ms) in enumerate((k, v) for k, v in mm.items() if k != "baseline"):
            ax.scatter([m["gap"] for m in ms], [_basin(m, cut, "log10_volume") for m in ms],
                       marker=markers[j % len(markers)], s=30, facecolors="none",
                       edgecolors=f"C{j + 1}", label=_label(meth))
        ax.set_xlabel("generalization gap (train acc - test acc)")
        ax.set_ylabel("log10 basin volume")
        ax.set_title(f"train-loss cutoff {cut}")
    axes[0][-1].legend(fontsize=7, loc="best")
    return _save(fig, path)


def fig_methods(res: dict[str, Any], path: Path, spirals: bool) -> str:
    mm = method_models(res)
    names = list(mm)
    cut = _main_cutoff(res)
    panels = [("test_acc", "test accuracy"), ("gap", "generalization gap"),
              ("radius_mean", f"basin radius (cutoff {cut})"),
              ("log10_volume", f"log10 volume (cutoff {cut})")]
    if spirals:
        panels.insert(2, ("margin_mean", "mean input margin"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), layout=_LAYOUT)
    for ax, (key, label) in zip(axes, panels, strict=True):
        def val(m: dict[str, Any], key: str = key) -> float:
            return _basin(m, cut, key) if key in ("radius_mean", "log10_volume") else m[key]
        mu = [_mean([val(m) for m in mm[n]]) for n in names]
        sd = [_std([val(m) for m in mm[n]]) for n in names]
        ax.bar(range(len(names)), mu, yerr=np.nan_to_num(sd), capsize=3,
               color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), [_label(n) for n in names], rotation=30)
        ax.set_title(label, fontsize=9)
        if key in ("test_acc",):
            lo = min(v for v in mu if math.isfinite(v))
            ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    return _save(fig, path)


# -- text -----------------------------------------------------------------------------------


def _trend(values: list[float]) -> str:
    v = [x for x in values if math.isfinite(x)]
    if len(v) < 2:
        return "cannot be judged"
    diffs = np.diff(v)
    if np.all(diffs > 0):
        return "rises monotonically"
    if np.all(diffs < 0):
        return "falls monotonically"
    return "rises overall" if v[-1] > v[0] else "falls overall"


def findings(res: dict[str, Any]) -> list[str]:
    """Plain-word findings computed from the numbers."""
    out: list[str] = []
    pm = poison_models(res)
    cut = _main_cutoff(res)
    factors = list(pm)
    if len(factors) >= 2:
        gap = [_mean([m["gap"] for m in pm[f]]) for f in factors]
        tr = [_mean([m["train_acc"] for m in pm[f]]) for f in factors]
        vol = [_mean([_basin(m, cut, "log10_volume") for m in pm[f]]) for f in factors]
        rad = [_mean([_basin(m, cut, "radius_mean") for m in pm[f]]) for f in factors]
        verdict = ("as in the paper" if gap[-1] > gap[0] else
                   "unlike the paper, where the gap grows with the poison")
        out.append(
            f"Train accuracy is at least {min(tr):.1%} for every poison factor, and the "
            f"generalization gap {_trend(gap)} from {gap[0]:.3f} (clean) to {gap[-1]:.3f} "
            f"(factor {factors[-1]:g}), {verdict}.")
        smaller = vol[-1] < vol[0]
        if not (math.isfinite(vol[0]) and math.isfinite(vol[-1])):
            out.append(f"The basin at train-loss cutoff {cut} could not be compared: some models' "
                       f"train loss is above the cutoff (no basin).")
        else:
            out.append(
                f"The mean filter-normalized basin radius at train-loss cutoff {cut} {_trend(rad)} "
                f"from {rad[0]:.4f} (clean) to {rad[-1]:.4f}, and the log10 volume from "
                f"{vol[0]:.0f} to {vol[-1]:.0f}: the clean basin is about "
                f"{abs(vol[0] - vol[-1]):.0f} orders of magnitude "
                f"{'larger' if smaller else 'smaller'} than the most poisoned one (in a "
                f"{res['num_params']:,}-dimensional weight space)"
                + ("." if smaller else ", the opposite of the paper's finding."))
        if "margin_mean" in pm[factors[0]][0]:
            mg = [_mean([m["margin_mean"] for m in pm[f]]) for f in factors]
            out.append(f"The mean input-space margin of the training points {_trend(mg)} from "
                       f"{mg[0]:.2f} (clean) to {mg[-1]:.2f}: the poisoned boundary hugs the "
                       f"points." if mg[-1] < mg[0] else
                       f"The mean input-space margin does not shrink with the poison "
                       f"({mg[0]:.2f} clean, {mg[-1]:.2f} at the largest factor).")
        allm = [m for ms in pm.values() for m in ms]
        g = np.array([m["gap"] for m in allm])
        v = np.array([_basin(m, cut, "log10_volume") for m in allm])
        ok = np.isfinite(g) & np.isfinite(v)
        if ok.sum() > 2 and np.std(g[ok]) > 0 and np.std(v[ok]) > 0:
            from scipy.stats import spearmanr
            rho = float(spearmanr(g[ok], v[ok]).statistic)
            out.append(f"Across the {int(ok.sum())} Baseline models (all poison factors and "
                       f"seeds) the Spearman rank correlation between log-volume and gap is "
                       f"{rho:+.2f} (the paper's picture predicts a strongly negative value).")
    mm = method_models(res)
    base = mm.get("baseline", [])
    keys = [("test_acc", "test accuracy", ".3f"), ("gap", "gap", ".3f")]
    if base and "margin_mean" in base[0]:
        keys.append(("margin_mean", "input margin", ".2f"))
    keys += [("radius_mean", "basin radius", ".4f"), ("log10_volume", "log10 volume", ".0f")]
    for meth, ms in mm.items():
        if meth == "baseline" or not ms or not base:
            continue
        parts = []
        for key, label, fmt in keys:
            def val(m: dict[str, Any], key: str = key) -> float:
                return _basin(m, cut, key) if key in ("radius_mean", "log10_volume") else m[key]
            a = [val(m) for m in ms]
            b = [val(m) for m in base]
            d = _mean(a) - _mean(b)
            spread = math.sqrt(np.nanmean([_std(a) ** 2, _std(b) ** 2])) if len(a) > 1 else math.nan
            note = ""
            if math.isfinite(spread) and spread > 0:
                note = f", {abs(d) / spread:.1f} seed-std" if abs(d) > 0 else ""
            parts.append(f"{label} {format(_mean(a), fmt)} vs {format(_mean(b), fmt)} "
                         f"({'+' if d >= 0 else ''}{format(d, fmt)}{note})")
        out.append(f"{_label(meth)} vs Baseline (each at its tuned learning rate, "
                   f"{len(ms)} seed{'s' if len(ms) > 1 else ''}): " + "; ".join(parts) + ".")
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _summary_rows(groups: list[tuple[str, list[dict[str, Any]]]], res: dict[str, Any],
                  spirals: bool) -> tuple[list[str], list[list[str]]]:
    cut = _main_cutoff(res)
    header = ["model", "lr", "train acc", "test acc", "gap"]
    if spirals:
        header.append("input margin")
    header += [f"radius @{cut}", f"log10 vol @{cut}", "weight norm"]
    rows = []
    for name, ms in groups:
        if not ms:
            continue
        row = [name, f"{ms[0]['lr']:g}", _ms([m["train_acc"] for m in ms]),
               _ms([m["test_acc"] for m in ms]), _ms([m["gap"] for m in ms])]
        if spirals:
            row.append(_ms([m["margin_mean"] for m in ms], ".2f"))
        row += [_ms([_basin(m, cut, "radius_mean") for m in ms], ".4f"),
                _ms([_basin(m, cut, "log10_volume") for m in ms], ".0f"),
                _ms([_basin(m, cut, "weight_norm") for m in ms], ".1f")]
        rows.append(row)
    return header, rows


def _strip(obj: Any) -> Any:
    """Results without the bulky grids, as plain JSON types."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k != "grid"}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def write_section(res: dict[str, Any], task: Any, out: Path, title: str) -> list[str]:
    """Figures of one study into ``out``; returns the Markdown lines of its section."""
    kind = res["kind"]
    spirals = kind == "spirals"
    cut = _main_cutoff(res)
    pm = poison_models(res)
    mm = method_models(res)
    cfg = res["config"]
    md = [f"## {title}", ""]
    md.append(f"{res['sizes']['train']} training points ({res['sizes']['val']} of them held out "
              f"as the validation split while tuning), {res['sizes']['test']} test points, "
              f"{res['sizes']['poison']} poison points; a {res['num_params']:,}-weight MLP; "
              f"{cfg['steps']} full-batch Adam steps (cosine decay, gradient clipping at 8); "
              f"seeds {list(cfg['seeds'])}; run time {res['seconds'] / 60:.1f} min.")
    md.append("")
    if spirals:
        md += [f"![data]({fig_data(task, out / f'{kind}_data.png')})", ""]
    md += ["### Learning-rate tuning (validation accuracy, mean over tuning seeds)", ""]
    grid = cfg["lr_grid"]
    rows = []
    for meth in cfg["methods"]:
        accs = []
        for lr in grid:
            v = [r["val_acc"] for r in res["tune"] if r["method"] == meth and r["lr"] == lr]
            accs.append(_ms(v))
        rows.append([_label(meth), *accs, f"**{res['lr'][meth]:g}**"])
    md += [_table(["method", *[f"lr {g:g}" for g in grid], "chosen"], rows), ""]
    hp = {m["method"]: m["hparams"] for m in res["models"]}
    if any(hp.values()):
        md += ["Method hyperparameters (the library's defaults): " + "; ".join(
            f"{_label(k)} {v}" for k, v in hp.items() if v), ""]

    md += ["### Poisoned models", ""]
    groups = [(f"poison {f:g}" if f else "clean", ms) for f, ms in pm.items()]
    header, rows = _summary_rows(groups, res, spirals)
    md += [_table(header, rows), ""]
    first = cfg["seeds"][0]
    pe = [(f"poison {f:g}" if f else "clean", next(m for m in ms if m["seed"] == first))
          for f, ms in pm.items()]
    if spirals:
        md += [f"![boundaries]({fig_boundaries(pe, task, out / f'{kind}_boundaries_poison.png')})",
               ""]
    md += [f"![rollouts]({fig_rollouts(pe, float(cut), out / f'{kind}_rollouts_poison.png')})",
           "", f"Train loss along {cfg['rollout_directions']} random filter-normalized "
           f"directions around each minimum (seed {first}); dashed: the cutoff {cut}.", ""]
    md += [f"![radii]({fig_radii(pe, cut, out / f'{kind}_radii_poison.png')})", "",
           f"Basin radius along each of the {2 * cfg['num_directions']} sampled rays "
           f"(filter-normalized directions, both signs; seed {first}).", ""]
    md += [f"![gap]({fig_gap_vs_poison(res, out / f'{kind}_gap_vs_poison.png')})", ""]
    md += [f"![volume]({fig_volume_vs_gap(res, out / f'{kind}_volume_vs_gap.png')})", "",
           "One point per trained model; log10 volume of the basin {train loss < cutoff} from "
           f"{cfg['num_directions']} isotropic directions (both signs), typical bootstrap "
           f"standard error {_mean([_basin(m, cut, 'log10_volume_se') for m in res['models']]):.0f}"
           " (the Monte-Carlo estimate is dominated by the largest sampled radius).", ""]

    md += ["### Flat-minima methods on clean data", ""]
    header, rows = _summary_rows([(_label(k), v) for k, v in mm.items()], res, spirals)
    md += [_table(header, rows), ""]
    me = [(_label(k), next(m for m in v if m["seed"] == first)) for k, v in mm.items() if v]
    if spirals:
        md += [f"![methods]({fig_boundaries(me, task, out / f'{kind}_boundaries_methods.png')})",
               ""]
    md += [f"![methods]({fig_methods(res, out / f'{kind}_methods.png', spirals)})", ""]
    md += [f"![rollouts]({fig_rollouts(me, float(cut), out / f'{kind}_rollouts_methods.png')})",
           ""]
    md += [f"![radii]({fig_radii(me, cut, out / f'{kind}_radii_methods.png')})", ""]
    md += ["### Findings", ""] + [f"- {s}" for s in findings(res)] + [""]
    return md


def write_report(results: list[tuple[dict[str, Any], Any, str]], out_dir: str | os.PathLike,
                 *, command: str, preamble: Sequence[str] = ()) -> Path:
    """Write ``report.md``, the figures and ``results.json`` for each ``(results, task, title)``.

    Returns the path of ``report.md``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = ["# Generalization-visualization study", "",
          f"Made with `{command}`.", ""] + list(preamble)
    for res, task, title in results:
        md += write_section(res, task, out, title)
    path = out / "report.md"
    tmp = out / "report.md.tmp"
    tmp.write_text("\n".join(md) + "\n")
    os.replace(tmp, path)
    js = out / "results.json.tmp"
    js.write_text(json.dumps(_strip([r for r, _, _ in results]), indent=1))
    os.replace(js, out / "results.json")
    return path


__all__ = ["write_report", "write_section", "findings", "poison_models", "method_models"]
