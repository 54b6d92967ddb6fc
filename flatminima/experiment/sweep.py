"""``flatminima sweep``: a grid (or list) of settings x seeds on an Optuna RDB study.

Sweep file (YAML)::

    study: mnist1d-grid            # study name (default: from the file name)
    base: {dataset: mnist1d, model: mlp, epochs: 30, val_split: 0.1}   # or base: other.yaml
    grid:                          # or a list of grids, or list: [{...}, {...}]
      method: [baseline, rpr, nrs]
      lr: [0.05, 0.1, 0.2]
      rho: [0.05, 0.1]             # applied to the methods that take rho
    seeds: [0, 1, 2]
    select: val_acc                # metric that picks the best setting per method

Any number of workers may run the same command at once, on one machine (SQLite file, the default)
or many (``--storage postgresql://...``); each cell runs exactly once, and a restarted sweep runs
only the missing cells (see :mod:`flatminima.experiment.engine`). At the end the best setting per
method (best mean of ``select`` over seeds) is printed with mean ± std of its metrics, and written
with the full table of settings to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flatminima.experiment import report as rep
from flatminima.experiment.cells import Cell, expand, parse_grid_option, parse_seeds
from flatminima.experiment.checkpoint import atomic_write_text
from flatminima.experiment.config import (
    Config,
    ConfigError,
    build_config,
    read_yaml,
    split_overrides,
)
from flatminima.experiment.engine import CellResult, GridWorker, storage_url
from flatminima.experiment.logs import progress

METRICS = ("test_acc", "val_acc", "train_acc", "test_loss", "train_loss")
_SWEEP_KEYS = ("study", "base", "grid", "list", "seeds", "select")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="grid or list of settings x seeds on an Optuna study (resumable, parallel)",
        description="Run a grid of settings x seeds. Start the same command on several "
                    "terminals or machines to share the work; restart it to finish missing cells.")
    p.add_argument("items", nargs="*", metavar="SWEEP.yaml | key=value",
                   help="an optional sweep file first, then overrides of the base config")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="add a grid axis (repeatable), e.g. --grid lr=0.05,0.1")
    p.add_argument("--seeds", default=None, help="count (3), list (0,1,2) or range (0-2)")
    p.add_argument("--study", default=None, help="Optuna study name")
    p.add_argument("--storage", default=None,
                   help="SQLAlchemy URL or SQLite file (default: <runs>/study.db)")
    p.add_argument("--runs", default=None, help="folder of the cells' run folders")
    p.add_argument("--report", default=None, help="report folder (default: <runs>/report)")
    p.add_argument("--select", default=None, help="metric to pick the best setting "
                   "(default val_acc if val_split > 0, else test_acc)")
    p.add_argument("--no-wait", action="store_true",
                   help="exit when no free cell is left instead of waiting for other workers")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds without heartbeat after which a cell is taken over")
    p.add_argument("-q", "--quiet", action="store_true")


def load_plan(path: str | None, overrides: Sequence[str], grid_items: Sequence[str],
              seeds: str | None) -> tuple[dict[str, Any], list[Cell], dict[str, Any]]:
    """(base config values, cells, sweep options) from a file, overrides and options."""
    spec: dict[str, Any] = read_yaml(path) if path else {}
    unknown = [k for k in spec if k not in _SWEEP_KEYS]
    if unknown:
        raise ConfigError(f"sweep file {path!r}: unknown key {unknown[0]!r} "
                          f"(keys: {', '.join(_SWEEP_KEYS)})")
    base = spec.get("base", {})
    if isinstance(base, str):
        base = read_yaml(Path(path).parent / base if path else base)
    if not isinstance(base, Mapping):
        raise ConfigError("base: expected a mapping or a YAML file name")
    base = {**base, **split_overrides(overrides)}
    if "grid" in spec and "list" in spec:
        raise ConfigError("sweep file: give grid or list, not both")
    kind = "list" if "list" in spec else "grid"
    grid = spec.get(kind, {})
    if grid_items:
        if kind == "list" or not isinstance(grid, Mapping):
            raise ConfigError("--grid: combine only with a single grid mapping")
        grid = {**grid, **parse_grid_option(grid_items)}
    if not grid:
        grid = {}
    seed_list = parse_seeds(seeds) if seeds else spec.get("seeds", [0])
    if isinstance(seed_list, int):
        seed_list = list(range(seed_list))
    if not isinstance(seed_list, list) or not all(isinstance(s, int) for s in seed_list):
        raise ConfigError(f"seeds: {seed_list!r} is not a list of integers")
    cells = expand(grid, seed_list, default_method=str(base.get("method", "baseline")),
                   grid_kind=kind)
    return base, cells, {"study": spec.get("study"), "select": spec.get("select")}


def cell_config(base: Mapping[str, Any], cell: Cell, runs: Path, **extra: Any) -> Config:
    """The full config of one cell (validated)."""
    values = {**base, **cell.params, "seed": cell.seed, "out": str(runs / cell.slug),
              "quiet": True, **extra}
    return build_config(values)


def run_cell(cfg: Config) -> dict[str, Any]:
    """Train one cell; a diverged run is a result ("status": "diverged"), not an error."""
    from flatminima.experiment.train import TrainingDiverged, train

    try:
        metrics = train(cfg)
    except TrainingDiverged as e:
        return {"status": "diverged", "error": " ".join(str(e).split()), "out": cfg.out}
    return {**metrics, "status": "ok"}


def method_of(setting: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    return str(setting.get("method", base.get("method", "baseline")))


def run(args: argparse.Namespace) -> int:
    from flatminima.experiment.train_cmd import split_items

    path, overrides = split_items(args.items)
    base, cells, opts = load_plan(path, overrides, args.grid, args.seeds)
    study = args.study or opts["study"] or (Path(path).stem if path else "sweep")
    runs = Path(args.runs or Path("runs") / "sweep" / study)
    # Validate every cell before anything is written: a bad value fails the whole sweep at once.
    configs = {c.key: cell_config(base, c, runs) for c in cells}
    has_val = all(cfg.val_split > 0 for cfg in configs.values())
    select = args.select or opts["select"] or ("val_acc" if has_val else "test_acc")
    if select not in METRICS:
        raise ConfigError(f"select={select!r}: choose one of {', '.join(METRICS)}")
    if select == "val_acc" and not has_val:
        raise ConfigError("select='val_acc' needs val_split > 0 in the base config")
    if not args.heartbeat > 0:
        raise ConfigError(f"--heartbeat={args.heartbeat}: must be > 0")
    if not args.grace > args.heartbeat:
        raise ConfigError(f"--grace={args.grace}: must exceed --heartbeat={args.heartbeat}")
    url = storage_url(args.storage, runs / "study.db")
    worker = GridWorker(url, study, select=select, heartbeat_s=args.heartbeat,
                        grace_s=args.grace)
    bar = progress(total=len(cells), desc=f"sweep {study}", quiet=args.quiet, unit="run",
                   leave=True)

    def on_done(result: CellResult, here: bool) -> None:
        bar.update(1)
        value = result.metrics.get(select)
        bar.set_postfix_str(f"{result.cell.slug} {select}="
                            f"{value if isinstance(value, str) else _f(value)}")

    results = worker.run(cells, lambda c: run_cell(configs[c.key]), wait=not args.no_wait,
                         on_done=on_done)
    bar.close()
    if len(results) < len(cells):
        print(f"sweep {study}: {len(results)}/{len(cells)} cells finished; the rest are held "
              "by other workers (run again to wait for them)")
        return 0
    text = write_sweep_report(Path(args.report or runs / "report"), results.values(), base,
                              select, study, url)
    print(text, end="")
    return 0


def _f(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, int | float) and math.isfinite(x) else str(x)


def best_table(results: Sequence[CellResult] | Any, base: Mapping[str, Any], select: str
               ) -> tuple[list[str], list[list[Any]], list[rep.SettingSummary]]:
    summaries = rep.summarize(results, METRICS)
    best = rep.best_per_group(summaries, lambda s: method_of(s, base), select)
    header = ["method", "best setting", "seeds", "test acc", "val acc", "train acc", "gap"]
    rows = []
    for method, s in best.items():
        gap = [t - e for t, e in zip(s.values["train_acc"], s.values["test_acc"], strict=True)]
        gap_mean = sum(gap) / len(gap) if gap else math.nan
        gap_std = float(__import__("numpy").std(gap, ddof=1)) if len(gap) > 1 else 0.0
        rows.append([method, rep.describe(s.setting), len(s.seeds),
                     rep.fmt_pm(s.mean("test_acc"), s.std("test_acc")),
                     rep.fmt_pm(s.mean("val_acc"), s.std("val_acc")),
                     rep.fmt_pm(s.mean("train_acc"), s.std("train_acc")),
                     rep.fmt_pm(gap_mean, gap_std)])
    return header, rows, summaries


def write_sweep_report(out: Path, results: Any, base: Mapping[str, Any], select: str,
                       study: str, url: str) -> str:
    results = list(results)
    header, rows, summaries = best_table(results, base, select)
    title = (f"Sweep {study}: best setting per method by mean {select} over seeds "
             f"(mean ± std over seeds)")
    with rep.atomic_dir(out) as tmp:
        atomic_write_text(tmp / "best.md", f"{title}\n\n" + rep.markdown_table(header, rows))
        atomic_write_text(tmp / "best.csv", rep.csv_text(header, rows))
        sh, sr = rep.settings_rows(summaries, METRICS)
        atomic_write_text(tmp / "settings.csv", rep.csv_text(sh, sr))
        atomic_write_text(tmp / "cells.json", json.dumps(
            [{"setting": r.cell.params, "seed": r.cell.seed,
              **{k: v for k, v in r.metrics.items() if k != "history"}} for r in results],
            indent=1, default=str))
    return f"{title}\n{rep.text_table(header, rows)}report: {out}  study: {study} on {url}\n"
