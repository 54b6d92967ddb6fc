"""``flatminima compare``: Baseline vs RPR vs NRS vs SAM, tuned fairly, as a table and plots.

The protocol (README, "Traps"). NRS minimizes a *sum* of two cross-entropies plus a KL term, so
at one learning rate it takes steps about twice as large as Baseline; on small data the
learning rate alone moves accuracy and sharpness more than any method. So, by default:

* every method (variant) gets its **own learning rate**, chosen from the same grid by the mean
  **validation** accuracy over seeds (10% of the training set held out, stratified); the test set
  is never used to choose anything;
* two controls separate the KL term from the step size: NRS with ``alpha=0`` (``L(w) + L(w+u)``)
  and NRS with ``rho=0`` (``2 L(w)``: exactly Baseline's gradient doubled);
* every number is mean ± std (ddof=1) over 3 seeds; a learning rate chosen at the edge of the
  grid is flagged, since the grid may then be too narrow for that method.

For the selected setting of each variant the table adds the generalization gap, the top Hessian
eigenvalue of the training loss and the model divergence ``E_u KL(f_w || f_{w+u})``, measured on
a fixed subset of the training set. Every finished run is stored in an Optuna study under
``--runs``, so a second ``compare`` (or one killed and restarted) reuses it.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flatminima.experiment import report as rep
from flatminima.experiment.cells import Cell, parse_seeds
from flatminima.experiment.checkpoint import atomic_write_text
from flatminima.experiment.config import (
    Config,
    ConfigError,
    method_signature,
    read_yaml,
    split_overrides,
)
from flatminima.experiment.engine import CellResult, GridWorker, storage_url
from flatminima.experiment.logs import progress
from flatminima.experiment.sweep import cell_config, run_cell

# The embedded default (configs/compare.yaml is the same, for reading and editing).
DEFAULT_BASE: dict[str, Any] = {
    "dataset": "mnist1d", "model": "mlp", "val_split": 0.1, "optimizer": "sgd",
    "momentum": 0.9, "weight_decay": 0.0, "schedule": "cosine", "epochs": 30,
    "batch_size": 100, "tensorboard": False, "threads": 1,
}
# On this MLP without warm-up, lr 0.4 diverges or stalls for most methods and seeds, while the
# doubled-step variants (NRS, its rho=0 control) peak near 0.05: 0.025 keeps them off the edge.
DEFAULT_LRS = (0.025, 0.05, 0.1, 0.2)
DEFAULT_SEEDS = (0, 1, 2)
# label -> method and its fixed hyperparameters (the paper's rho for MNIST-scale runs).
DEFAULT_VARIANTS: dict[str, dict[str, Any]] = {
    "Baseline": {"method": "baseline"},
    "RPR": {"method": "rpr", "rho": 0.05},
    "NRS": {"method": "nrs", "rho": 0.05, "alpha": 1.0},
    "SAM": {"method": "sam", "rho": 0.05},
}
CONTROLS: dict[str, dict[str, Any]] = {
    "NRS alpha=0": {"method": "nrs", "rho": 0.05, "alpha": 0.0},
    "NRS rho=0": {"method": "nrs", "rho": 0.0, "alpha": 1.0},
}
MEASURE_EXAMPLES = 1000     # training examples the curvature / divergence are measured on
DIVERGENCE_RHO = 0.05
DIVERGENCE_SAMPLES = 10


@dataclass
class Plan:
    base: dict[str, Any]
    variants: dict[str, dict[str, Any]]
    lrs: list[float]
    seeds: list[int]

    def cells(self) -> list[Cell]:
        return [Cell(tuple(sorted({**v, "lr": lr}.items())), s)
                for v in self.variants.values() for lr in self.lrs for s in self.seeds]

    def label(self, setting: Mapping[str, Any]) -> str:
        rest = {k: v for k, v in setting.items() if k != "lr"}
        for name, v in self.variants.items():
            if v == rest:
                return name
        return json.dumps(rest, sort_keys=True)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="Baseline vs RPR vs NRS vs SAM with per-method tuned learning rate "
                        "(the default: MNIST-1D, 3 seeds, a few minutes on a CPU)",
        description="Compare methods fairly: each gets its own learning rate from one grid, "
                    "chosen on a validation split; NRS controls alpha=0 and rho=0; mean ± std "
                    "over seeds. key=value items override the base config (dataset=, model=, "
                    "epochs=, weight_decay=, rho=, alpha=, ...).")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML (keys: base, methods, lrs, seeds) then overrides")
    p.add_argument("--methods", default=None,
                   help="comma list of methods (default: baseline,rpr,nrs,sam)")
    p.add_argument("--lrs", default=None, help="learning-rate grid, comma list "
                   f"(default: {','.join(map(str, DEFAULT_LRS))})")
    p.add_argument("--seeds", default=None, help="count (3), list (0,1,2) or range (0-2)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--no-controls", action="store_true",
                   help="leave out the NRS alpha=0 and rho=0 controls")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the Hessian eigenvalue and model divergence")
    p.add_argument("--measure-examples", type=int, default=MEASURE_EXAMPLES,
                   help=f"training examples for the Hessian and divergence "
                        f"(default {MEASURE_EXAMPLES})")
    p.add_argument("--runs", default=None, help="run folders and study (default: runs/compare)")
    p.add_argument("--out", default="reports/compare", help="report folder")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite file)")
    p.add_argument("--workers", type=int, default=None,
                   help="parallel worker processes on this machine, one thread each "
                        "(default: number of CPU cores, at most 4)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars; table only")


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what}={text!r}: expected a comma list of numbers") from None
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ConfigError(f"{what}={text!r}: need positive numbers")
    return values


def make_plan(args: argparse.Namespace) -> Plan:
    from flatminima.experiment.train_cmd import split_items
    from flatminima.methods import list_methods

    path, overrides = split_items(args.items)
    spec = read_yaml(path) if path else {}
    allowed = ("base", "methods", "lrs", "seeds", "controls")
    bad = [k for k in spec if k not in allowed]
    if bad:
        raise ConfigError(f"compare file {path!r}: unknown key {bad[0]!r} "
                          f"(keys: {', '.join(allowed)})")
    base = {**DEFAULT_BASE, **spec.get("base", {}), **split_overrides(overrides)}
    if args.epochs is not None:
        base["epochs"] = args.epochs
    # Method hyperparameters given as overrides (rho=0.1) go to the variants that take them.
    shared = {k: base.pop(k) for k in list(base) if k not in _config_fields()
              and not k.startswith(("model.", "model_args."))}
    if args.methods is not None:
        names = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        if not names:
            raise ConfigError(f"--methods={args.methods!r}: give at least one method")
        known = list_methods()
        for m in names:
            if m not in known:
                raise ConfigError(f"--methods: unknown method {m!r}; choose from "
                                  f"{', '.join(known)}")
        by_method = {v["method"]: (k, v) for k, v in DEFAULT_VARIANTS.items()}
        variants = {by_method[m][0] if m in by_method else m: dict(by_method[m][1])
                    if m in by_method else {"method": m} for m in names}
    elif "methods" in spec:
        variants = {}
        for item in spec["methods"]:
            if not isinstance(item, Mapping) or "method" not in item:
                raise ConfigError("methods: each entry needs a 'method' key")
            item = dict(item)
            variants[str(item.pop("label", item["method"]))] = item
    else:
        variants = {k: dict(v) for k, v in DEFAULT_VARIANTS.items()}
    controls = spec.get("controls", True) and not args.no_controls
    if controls and any(v["method"] == "nrs" for v in variants.values()):
        variants.update({k: dict(v) for k, v in CONTROLS.items()})
    for label, v in variants.items():
        sig = method_signature(v["method"])
        for k, value in shared.items():
            if k in sig and not (label in CONTROLS and k in CONTROLS[label]
                                 and CONTROLS[label][k] == 0):
                v[k] = value
        if shared and not any(k in method_signature(x["method"]) for x in variants.values()
                              for k in shared):
            raise ConfigError(f"unknown key {next(iter(shared))!r}: neither a config field "
                              "nor a hyperparameter of the compared methods")
    lrs = _floats(args.lrs, "lrs") if args.lrs is not None else [float(x) for x in
                                                     spec.get("lrs", DEFAULT_LRS)]
    seeds = parse_seeds(args.seeds) if args.seeds else list(spec.get("seeds", DEFAULT_SEEDS))
    plan = Plan(base, variants, lrs, seeds)
    if "val_split" in base and float(base["val_split"]) <= 0:
        raise ConfigError("val_split must be > 0 for compare: the learning rate is chosen on it")
    return plan


def _config_fields() -> set[str]:
    from flatminima.experiment.config import FIELDS

    return set(FIELDS)


# ----------------------------------------------------------------------------- measurements

def measure_run(cfg: Config, examples: int = MEASURE_EXAMPLES) -> dict[str, float]:
    """Top Hessian eigenvalue and model divergence of a finished run, on a fixed subset of its
    training data (cached in the run folder)."""
    from flatminima.experiment.measure import cached_in_run

    def compute() -> dict[str, float]:
        import torch

        from flatminima import hessian
        from flatminima.experiment.measure import load_run, measure_batch
        from flatminima.experiment.train import loss_function

        model, data_batch, _ = load_run(cfg, examples=examples)
        gen = torch.Generator().manual_seed(0)
        values = {"hessian_top": float(hessian.eigenvalues(
            model, loss_function(cfg), data_batch, k=1, generator=gen)[0])}
        values.update(measure_batch(model, data_batch, rho=DIVERGENCE_RHO,
                                    samples=DIVERGENCE_SAMPLES))
        return values

    key = {"examples": examples, "rho": DIVERGENCE_RHO, "samples": DIVERGENCE_SAMPLES}
    return cached_in_run(cfg, "measures.json", key, compute)


# ----------------------------------------------------------------------------- the command

def _helper(url: str, cells: list[Cell], configs: dict[str, Config]) -> None:
    """A helper process: one more worker on the same study (errors surface in the parent, which
    runs a failed cell itself once the helper has released it)."""
    import torch

    torch.set_num_threads(1)
    try:
        GridWorker(url, "compare", select="val_acc").run(
            cells, lambda c: run_cell(configs[c.key]), wait=False)
    except Exception:
        pass

def run(args: argparse.Namespace) -> int:
    if args.measure_examples < 1:
        raise ConfigError(f"--measure-examples={args.measure_examples}: must be >= 1")
    plan = make_plan(args)
    runs = Path(args.runs or "runs/compare")
    cells = plan.cells()
    configs = {c.key: cell_config(plan.base, c, runs) for c in cells}  # validates everything
    url = storage_url(args.storage, runs / "study.db")
    worker = GridWorker(url, "compare", select="val_acc")
    workers = args.workers if args.workers is not None else min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers={workers}: must be >= 1")
    # Helpers share the study with this process; the claim table hands each cell to one of them.
    ctx = multiprocessing.get_context("spawn")
    helpers = [ctx.Process(target=_helper, args=(url, cells, configs), daemon=True)
               for _ in range(workers - 1)]
    for h in helpers:
        h.start()
    bar = progress(total=len(cells), desc="compare", quiet=args.quiet, unit="run", leave=False)

    def on_done(result: CellResult, here: bool) -> None:
        bar.update(1)
        v = result.metrics.get("val_acc")
        bar.set_postfix_str(f"{plan.label(result.cell.params)} lr={result.cell.params['lr']} "
                            f"seed={result.cell.seed} val={v:.1f}" if isinstance(v, float)
                            else "diverged")

    try:
        results = worker.run(cells, lambda c: run_cell(configs[c.key]), on_done=on_done)
    finally:
        for h in helpers:
            h.join(timeout=60)
            if h.is_alive():
                h.terminate()
    bar.close()
    summaries = rep.summarize(results.values(), ("val_acc", "test_acc", "train_acc"))
    best = rep.best_per_group(summaries, plan.label, "val_acc")
    best = {k: best[k] for k in plan.variants if k in best}
    measures: dict[str, list[dict[str, float]]] = {}
    if not args.no_measure:
        todo = [(label, r) for label, s in best.items() for r in s.results
                if r.metrics.get("status") == "ok"]
        mbar = progress(todo, desc="measure", quiet=args.quiet, unit="run", leave=False)
        for label, r in mbar:
            measures.setdefault(label, []).append(
                measure_run(configs[r.cell.key], args.measure_examples))
    text = write_report(Path(args.out), plan, best, measures, summaries, args.measure_examples)
    print(text, end="")
    return 0


def _ms(values: Sequence[float], digits: int = 2) -> str:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return "n/a"
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    fmt = f".{digits}f" if max(abs(x) for x in v) >= 0.01 or digits > 3 else ".2e"
    return rep.fmt_pm(float(np.mean(v)), std, fmt)


def table(plan: Plan, best: Mapping[str, rep.SettingSummary],
          measures: Mapping[str, list[dict[str, float]]]) -> tuple[str, list[str], list[list]]:
    title = (f"{plan.base['dataset']} / {plan.base['model']}, {plan.base['epochs']} epochs, "
             f"{len(plan.seeds)} seeds: learning rate tuned per method on the grid "
             f"{{{', '.join(f'{x:g}' for x in plan.lrs)}}} by mean validation accuracy "
             f"({plan.base.get('val_split', 0.1):g} of train held out; test set never used "
             "for selection); mean ± std over seeds")
    header = ["method", "hyperparameters", "lr", "test acc", "train acc", "gap",
              "top Hessian eig", "model divergence", "cost per step"]
    ms = {label: step_ms(s) for label, s in best.items()}
    base_ms = ms.get(next((k for k, v in plan.variants.items() if v["method"] == "baseline"
                           and len(v) == 1), ""), math.nan)
    rows: list[list[Any]] = []
    for label, s in best.items():
        hp = rep.describe({k: v for k, v in s.setting.items() if k != "lr"})
        lr = s.setting["lr"]
        edge = " (grid edge)" if len(plan.lrs) > 1 and lr in (min(plan.lrs), max(plan.lrs)) \
            else ""
        gap = [a - b for a, b in zip(s.values["train_acc"], s.values["test_acc"], strict=True)]
        m = measures.get(label, [])
        rows.append([label, hp, f"{lr:g}{edge}",
                     rep.fmt_pm(s.mean("test_acc"), s.std("test_acc")),
                     rep.fmt_pm(s.mean("train_acc"), s.std("train_acc")),
                     _ms(gap) if s.diverged == 0 else "diverged",
                     _ms([x["hessian_top"] for x in m]) if m else "-",
                     _ms([x["divergence"] for x in m], 4) if m else "-",
                     _cost(ms[label], base_ms)])
    return title, header, rows


def step_ms(s: rep.SettingSummary) -> float:
    """Milliseconds per optimizer step of a setting's runs: the median over each run's epochs
    (the method and the optimizer's step, no data loading or evaluation), mean over seeds;
    NaN for runs recorded before steps were timed."""
    per_run = [float(np.median([row["step_ms"] for row in r.metrics["history"]]))
               for r in s.results if r.metrics.get("status") == "ok"
               and r.metrics.get("history") and all("step_ms" in row
                                                    for row in r.metrics["history"])]
    return float(np.mean(per_run)) if per_run else math.nan


def _cost(ms: float, base_ms: float) -> str:
    """``2.01x (3.4 ms)``: the time per step against Baseline's, measured in the same runs."""
    if not math.isfinite(ms):
        return "-"
    if not math.isfinite(base_ms) or base_ms <= 0:
        return f"{ms:.2f} ms"
    return f"{ms / base_ms:.2f}x ({ms:.2f} ms)"


def write_report(out: Path, plan: Plan, best: Mapping[str, rep.SettingSummary],
                 measures: Mapping[str, list[dict[str, float]]],
                 summaries: Sequence[rep.SettingSummary],
                 measure_examples: int = MEASURE_EXAMPLES) -> str:
    from flatminima import plots

    title, header, rows = table(plan, best, measures)
    with rep.atomic_dir(out) as tmp:
        note = (f"Model divergence: E_u KL(f_w || f_(w+u)), u uniform in a filter-relative ball "
                f"of radius {DIVERGENCE_RHO}, {DIVERGENCE_SAMPLES} samples; Hessian eigenvalue "
                f"and divergence on {measure_examples} training examples, eval mode. Cost per "
                "step: wall time of the method and the optimizer step (no data loading or "
                "evaluation), median over epochs, mean over seeds, against Baseline's in the "
                "same study. It is the runs' own wall time, so it also counts whatever else ran "
                "on the machine beside them; `benchmarks/step_cost.py` measures the ratios "
                "interleaved.\n")
        atomic_write_text(tmp / "table.md", f"{title}\n\n" + rep.markdown_table(header, rows)
                          + "\n" + note)
        atomic_write_text(tmp / "table.csv", rep.csv_text(header, rows))
        sh, sr = rep.settings_rows(summaries, ("val_acc", "test_acc", "train_acc"))
        atomic_write_text(tmp / "all_settings.csv", rep.csv_text(sh, sr))
        curves = {label: [[row.get("test_acc", math.nan) for row in r.metrics.get("history", [])]
                          for r in s.results if r.metrics.get("status") == "ok"]
                  for label, s in best.items()}
        curves = {k: v for k, v in curves.items() if v and len({len(c) for c in v}) == 1}
        plots.save_figure(plots.curves(curves, ylabel="test accuracy (%)",
                                       title="test accuracy, selected lr per method"),
                          tmp / "test_accuracy_curves.png")
        plots.save_figure(plots.error_bars(
            {label: s.values["test_acc"] for label, s in best.items()},
            ylabel="final test accuracy (%)", title="mean ± std over seeds"),
            tmp / "final_accuracy.png")
        if measures:
            plots.save_figure(plots.error_bars(
                {label: [x["hessian_top"] for x in m] for label, m in measures.items()},
                ylabel="top Hessian eigenvalue", log=True,
                title="sharpness at the selected lr (lower is flatter)"),
                tmp / "hessian_top.png")
        atomic_write_text(tmp / "plan.json", json.dumps(
            {"base": plan.base, "variants": plan.variants, "lrs": plan.lrs,
             "seeds": plan.seeds}, indent=1))
    return f"{title}\n\n{rep.text_table(header, rows)}\nreport: {out}\n"


def default_config_values() -> dict[str, Any]:
    """The embedded default as one mapping (what configs/compare.yaml holds)."""
    return {"base": dict(DEFAULT_BASE), "lrs": list(DEFAULT_LRS), "seeds": list(DEFAULT_SEEDS),
            "methods": [{"label": k, **v} for k, v in DEFAULT_VARIANTS.items()],
            "controls": True}
