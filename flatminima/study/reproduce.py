"""``flatminima reproduce NAME``: a paper's table or figure, run from its protocol file.

A protocol (:mod:`flatminima.study.protocol`) is data; this module runs it on the sweep
machinery (:class:`flatminima.experiment.engine.GridWorker`), so a run is resumable after a kill
(finished cells are kept in the study, a killed cell resumes from its checkpoint), parallel over
``--workers`` processes, and shared by every machine that points ``--storage`` at one Optuna RDB
(SQLite file by default, PostgreSQL for many hosts). Under ``torchrun`` every rank trains the same
cell together (DDP): rank 0 claims the cells and tells the others which one.

Per experiment (a data set x model x augmentation) the searches of the protocol run side by side:

* ``fair``: every variant gets its own learning rate from one grid, chosen on the validation
  split, with the NRS ``alpha=0`` and ``rho=0`` controls (``flatminima compare``'s protocol);
* ``paper``: the paper's protocol, Baseline grid-searched over its axes (e.g. learning rate x
  weight decay x batch size) first, then each method's own grid on top of the best Baseline
  setting;
* ``grid``: every setting of a grid reported, with its test accuracy over training (a figure).

Stages that depend on earlier ones (the paper search's second stage, fine-tuning after a
pretraining stage) are computed by every worker from the shared results, so all agree.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flatminima.experiment import report as rep
from flatminima.experiment.cells import Cell, expand, parse_seeds
from flatminima.experiment.config import Config, ConfigError, build_config, split_overrides
from flatminima.experiment.engine import CellResult, GridWorker, storage_url
from flatminima.experiment.logs import progress
from flatminima.study.protocol import Experiment, Protocol, list_protocols, load_protocol, merge

METRICS = ("val_acc", "test_acc", "train_acc", "test_loss", "train_loss", "test_top5")
CONTROLS = {
    "NRS alpha=0": {"alpha": 0.0},
    "NRS rho=0": {"rho": 0.0},
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "reproduce", help="run a paper's table or figure from its protocol (resumable, parallel)",
        description="Run a paper protocol at a scale: smoke (seconds), cpu (this machine, about "
                    "an hour), gpu (one GPU, hours), paper (the paper's settings). key=value "
                    "items override every run's config (data_root=, device=, epochs=, ...).")
    p.add_argument("name", nargs="?", help="protocol name (see --list) or a protocol YAML file")
    p.add_argument("items", nargs="*", metavar="key=value", help="config overrides for every run")
    p.add_argument("--list", action="store_true", help="list the protocols and exit")
    p.add_argument("--scale", default="cpu", help="smoke, cpu, gpu or paper (default cpu)")
    p.add_argument("--out", default=None,
                   help="report folder (default: reports/reproduce/<name>-<scale>)")
    p.add_argument("--runs", default=None,
                   help="run folders, shared by all protocols (default: runs/reproduce)")
    p.add_argument("--seeds", default=None, help="count (3), list (0,1,2) or range (0-2)")
    p.add_argument("--data", default=None,
                   help="folder the protocols' relative data_root values are read in "
                        "(default: $FLATMINIMA_DATA or ./data)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on this machine (default 1)")
    p.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers (default: <runs>/study.db)")
    p.add_argument("--no-wait", action="store_true",
                   help="exit when no free cell is left instead of waiting for other workers")
    p.add_argument("--grace", type=float, default=60.0,
                   help="seconds without heartbeat after which another worker's cell is taken")
    p.add_argument("-q", "--quiet", action="store_true")


# ----------------------------------------------------------------------------- listing

def list_text() -> str:
    rows = []
    for name in list_protocols():
        proto = load_protocol(name, "paper")
        hours = "; ".join(f"{s}: {proto.hours[s]}" for s in ("smoke", "cpu", "gpu", "paper")
                          if s in proto.hours)
        rows.append([name, proto.paper, proto.measures, hours])
    return rep.text_table(["protocol", "paper", "measures", "time per scale"], rows)


# ----------------------------------------------------------------------------- planning

@dataclass
class Stage:
    """One set of cells on one study, and how their results are grouped."""

    study: str
    base: dict[str, Any]
    cells: list[Cell]
    runs: Path
    label_of: Callable[[Mapping[str, Any]], str]
    configs: dict[str, Config] = field(default_factory=dict)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)


def _digest(values: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:10]


def experiment_base(proto: Protocol, exp: Experiment, overrides: Mapping[str, Any],
                    data: str | None = None) -> dict[str, Any]:
    """The config values every run of ``exp`` shares (protocol base, experiment, overrides).

    A relative ``data_root`` of the protocol is taken inside ``data`` (``--data``, default
    ``$FLATMINIMA_DATA`` or ``data``), so one folder holds every data set a protocol reads.
    """
    values = {"tensorboard": False, **proto.base, **exp.base}
    root = values.get("data_root")
    if isinstance(root, str) and not Path(root).is_absolute():
        base_dir = data or os.environ.get("FLATMINIMA_DATA", "data")
        values["data_root"] = str(Path(base_dir) / root)
    return {**values, **overrides}


def make_stage(study: str, base: Mapping[str, Any], settings: Sequence[Mapping[str, Any]],
               seeds: Sequence[int], runs_root: Path,
               label_of: Callable[[Mapping[str, Any]], str]) -> Stage:
    """Cells of ``settings`` x ``seeds`` on ``base``, each run in a folder named by its config,
    so that identical runs of two protocols (or two stages) are trained once."""
    base = dict(base)
    cells = expand([dict(s) for s in settings], seeds,
                   default_method=str(base.get("method", "baseline")), grid_kind="list")
    runs = runs_root / _slug(str(base.get("dataset", "data")))
    # The study is named by the stage's resolved base too: after an edit of the protocol's
    # settings (epochs, data, model) the same grid point is a new cell, not a stale result.
    base_id = build_config({**base, "quiet": True, "out": str(runs / "check")}).identity()
    stage = Stage(f"{study}@{_digest(base_id)}", base, cells, runs, label_of)
    for c in cells:
        values = {**base, **c.params, "seed": c.seed, "quiet": True}
        cfg = build_config({**values, "out": str(runs / "check")})  # validates first
        # Named by the resolved config: the same run planned by two searches (the fair one's
        # Baseline at lr 0.1 and the paper one's) or two protocols is one folder, trained once.
        name = f"{cfg.method}-s{c.seed}-{_digest(cfg.identity())}"
        stage.configs[c.key] = build_config({**values, "out": str(runs / name)})
    return stage


def fair_settings(search: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """label -> setting of the fair search: variants (plus controls for NRS) x the lr grid."""
    variants = {str(k): dict(v) for k, v in (search.get("variants") or {}).items()
                if v is not None}
    if not variants:
        raise ConfigError("search.fair: variants must name at least one method")
    if search.get("controls", True):
        nrs = [v for v in variants.values() if v.get("method") == "nrs"]
        if nrs:
            for label, change in CONTROLS.items():
                variants.setdefault(label, {**nrs[0], **change})
    return variants


def _grid(axes: Mapping[str, Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]


def label_for(variants: Mapping[str, Mapping[str, Any]], skip: Sequence[str] = ("lr",)
              ) -> Callable[[Mapping[str, Any]], str]:
    def label(setting: Mapping[str, Any]) -> str:
        rest = {k: v for k, v in setting.items() if k not in skip}
        for name, v in variants.items():
            if dict(v) == rest:
                return name
        return rep.describe(setting, skip=())
    return label


# ----------------------------------------------------------------------------- running

class Runner:
    """Runs stages on one storage: each stage's cells by this worker and any other."""

    def __init__(self, url: str, *, quiet: bool, wait: bool, grace: float,
                 objective: Callable[[Config], dict[str, Any]] | None = None) -> None:
        self.url, self.quiet, self.wait, self.grace = url, quiet, wait, grace
        self.objective = objective or _run_cell
        self.complete = True

    def run(self, stage: Stage) -> dict[str, CellResult]:
        worker = GridWorker(self.url, stage.study, select="val_acc", grace_s=self.grace)
        bar = progress(total=len(stage.cells), desc=stage.study.split("@")[0],
                       quiet=self.quiet, unit="run", leave=False)

        def on_done(result: CellResult, here: bool) -> None:
            bar.update(1)
            v = result.metrics.get("val_acc", result.metrics.get("test_acc"))
            bar.set_postfix_str(f"{stage.label_of(result.cell.params)} seed={result.cell.seed} "
                                + (f"acc={v:.1f}" if isinstance(v, float) else "diverged"))

        results = worker.run(stage.cells, lambda c: self.objective(stage.configs[c.key]),
                             wait=self.wait, on_done=on_done)
        bar.close()
        if len(results) < len(stage.cells):
            self.complete = False
        return results


def _run_cell(cfg: Config) -> dict[str, Any]:
    """Train (or resume) one run. Two stages may plan the same run (one folder, see
    :func:`make_stage`) and two workers may reach it at once: an exclusive lock on the folder
    makes the second wait and then read the finished run instead of training it beside the
    first. (``flock`` holds between processes of one host; hosts sharing ``--runs`` over a
    network file system may still meet in one folder, which costs time, not correctness: a
    run resumed from a checkpoint is bitwise the run that was not.)"""
    import fcntl

    from flatminima.experiment.sweep import run_cell

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return run_cell(cfg)


@dataclass
class SearchResult:
    """The selected setting per label of one search of one experiment."""

    search: str
    best: dict[str, rep.SettingSummary]
    summaries: list[rep.SettingSummary]
    grid_values: dict[str, list[Any]]
    configs: dict[str, Config]
    notes: list[str] = field(default_factory=list)
    reference: str = "Baseline"


def run_experiment(proto: Protocol, exp: Experiment, overrides: Mapping[str, Any],
                   seeds: Sequence[int], runs_root: Path, runner: Runner) -> list[SearchResult]:
    base = experiment_base(proto, exp, overrides)
    prefix = f"{proto.name}:{proto.scale}:{exp.label}"
    if proto.pretrain is not None:
        pre_base = {**base, **(proto.pretrain.get("base") or {}), **overrides}
        pre = make_stage(f"{prefix}:pretrain", pre_base, [{}], [seeds[0]], runs_root,
                         lambda s: "pretrain")
        done = runner.run(pre)
        if not done:
            return []
        cfg = next(iter(pre.configs.values()))
        base = {**base, "init_from": str(Path(cfg.out) / "last.pt")}
    out: list[SearchResult] = []
    select = proto.select
    searches = merge(proto.search, {k: v for k, v in exp.search.items() if k in proto.search})
    for name, search in searches.items():
        if name == "fair":
            variants = fair_settings(search)
            lrs = list(search.get("lrs") or [base.get("lr", 0.1)])
            settings = [{**v, "lr": lr} for v in variants.values() for lr in lrs]
            stage = make_stage(f"{prefix}:fair", base, settings, seeds, runs_root,
                               label_for(variants))
            results = runner.run(stage)
            summaries = rep.summarize(results.values(), METRICS)
            best = rep.best_per_group(summaries, stage.label_of, select)
            best = {k: best[k] for k in variants if k in best}
            out.append(SearchResult("fair", best, summaries, {"lr": lrs}, stage.configs))
        elif name == "paper":
            axes = dict(search.get("baseline") or {"lr": [base.get("lr", 0.1)]})
            first = [{"method": "baseline", **s} for s in _grid(axes)]
            stage1 = make_stage(f"{prefix}:paper:baseline", base, first, seeds, runs_root,
                                lambda s: "Baseline")
            res1 = runner.run(stage1)
            sums1 = rep.summarize(res1.values(), METRICS)
            best_base = rep.best_per_group(sums1, lambda s: "Baseline", select).get("Baseline")
            if best_base is None or not runner.complete:
                continue
            chosen = {k: best_base.setting[k] for k in axes}
            methods = {str(k): dict(v) for k, v in (search.get("methods") or {}).items()}
            settings, variants = [], {}
            for label, spec in methods.items():
                grid = dict(spec.pop("grid", {}) or {})
                for point in _grid(grid) if grid else [{}]:
                    settings.append({**chosen, **spec, **point})
                variants[label] = spec
            stage2 = make_stage(f"{prefix}:paper:methods", base, settings, seeds, runs_root,
                                _method_label(variants))
            res2 = runner.run(stage2)
            sums2 = rep.summarize(res2.values(), METRICS)
            found = rep.best_per_group(sums2, stage2.label_of, select)
            best = {"Baseline": best_base, **{k: found[k] for k in variants if k in found}}
            configs = {**stage1.configs, **stage2.configs}
            out.append(SearchResult("paper", best, sums1 + sums2, axes, configs,
                                    [f"Baseline chosen at {rep.describe(chosen, skip=())}; "
                                     "the methods searched on top of it."]))
        else:  # grid
            settings_spec = search.get("settings") or {}
            variants = {}
            settings = []
            for label, spec in settings_spec.items():
                spec = dict(spec)
                points = _grid({k: v for k, v in spec.items()})
                for p in points:
                    lab = label if len(points) == 1 else f"{label} " + rep.describe(
                        {k: v for k, v in p.items() if isinstance(spec.get(k), list)}, skip=())
                    variants[lab] = p
                    settings.append(p)
            stage = make_stage(f"{prefix}:grid", base, settings, seeds, runs_root,
                               label_for(variants, skip=()))
            results = runner.run(stage)
            summaries = rep.summarize(results.values(), METRICS)
            best = {label_for(variants, skip=())(s.setting): s for s in summaries}
            best = {k: best[k] for k in variants if k in best}
            reference = str(search.get("baseline", next(iter(variants), "Baseline")))
            out.append(SearchResult("grid", best, summaries, {}, stage.configs,
                                    reference=reference))
    return out


def _method_label(variants: Mapping[str, Mapping[str, Any]]) -> Callable[[Mapping[str, Any]], str]:
    def label(setting: Mapping[str, Any]) -> str:
        method = setting.get("method")
        for name, v in variants.items():
            if v.get("method") == method and all(setting.get(k) == x for k, x in v.items()):
                return name
        return str(method)
    return label


# ----------------------------------------------------------------------------- measurements

def measure_cell(cfg: Config, measures: Sequence[str], examples: int = 1000) -> dict[str, float]:
    """The protocol's measurements of a finished run on a fixed training subset (eval mode),
    cached in the run folder."""
    from flatminima.experiment.measure import cached_in_run

    def compute() -> dict[str, float]:
        import torch

        from flatminima import hessian
        from flatminima.experiment.measure import load_run, measure_batch
        from flatminima.experiment.train import loss_function

        model, batch, _ = load_run(cfg, examples=examples)
        loss_fn = loss_function(cfg)
        values: dict[str, float] = {}
        gen = torch.Generator().manual_seed(0)
        for name, params in (("hessian_top", None), ("hessian_top_last_layer", "last_layer")):
            if name in measures:
                values[name] = float(hessian.eigenvalues(model, loss_fn, batch, k=1,
                                                         params=params, generator=gen)[0])
        if "hessian_trace" in measures:
            values["hessian_trace"] = float(hessian.trace(model, loss_fn, batch,
                                                          num_matvecs=60, generator=gen))
        if "divergence" in measures:
            values["divergence"] = measure_batch(model, batch, rho=0.05, samples=10)["divergence"]
        return values

    key = {"measures": sorted(measures), "examples": examples}
    return cached_in_run(cfg, "reproduce_measures.json", key, compute)


# ----------------------------------------------------------------------------- the command

def _work(spec: dict[str, Any]) -> None:
    """A helper process: the same protocol on the same storage, no report."""
    import torch

    torch.set_num_threads(1)
    try:
        proto = load_protocol(spec["name"], spec["scale"])
        runner = Runner(spec["url"], quiet=True, wait=False, grace=spec["grace"])
        for exp in proto.experiments:
            run_experiment(proto, exp, spec["overrides"], spec["seeds"], Path(spec["runs"]),
                           runner)
    except Exception:  # the parent runs whatever a failed helper left and reports the error
        pass


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(list_text(), end="")
        return 0
    if not args.name:
        raise ConfigError("reproduce: name a protocol (see flatminima reproduce --list)")
    proto = load_protocol(args.name, args.scale)
    overrides = split_overrides(args.items)
    if args.data is not None:
        os.environ["FLATMINIMA_DATA"] = args.data  # read by the helper processes too
    if proto.kind == "command":
        return _run_command(proto, args, overrides)
    seeds = parse_seeds(args.seeds) if args.seeds else proto.seeds
    if args.workers < 1:
        raise ConfigError(f"--workers={args.workers}: must be >= 1")
    if not args.grace > 0:
        raise ConfigError(f"--grace={args.grace}: must be > 0")
    runs_root = Path(args.runs or "runs/reproduce")
    out = Path(args.out or f"reports/reproduce/{proto.name}-{proto.scale}")
    url = storage_url(args.storage, runs_root / "study.db")
    # Validate every experiment's first stage before anything runs or is written.
    for exp in proto.experiments:
        base = experiment_base(proto, exp, overrides)
        build_config({**base, "quiet": True, "out": str(runs_root / "check")})
    from flatminima.study.reproduce_report import write_report

    if _world() > 1:
        return _run_distributed(proto, args, overrides, seeds, runs_root, out, url)
    spec = {"name": args.name, "scale": args.scale, "url": url, "grace": args.grace,
            "overrides": overrides, "seeds": list(seeds), "runs": str(runs_root)}
    ctx = multiprocessing.get_context("spawn")
    helpers = [ctx.Process(target=_work, args=(spec,), daemon=True)
               for _ in range(args.workers - 1)]
    for h in helpers:
        h.start()
    runner = Runner(url, quiet=args.quiet, wait=not args.no_wait, grace=args.grace)
    try:
        results = {exp.label: run_experiment(proto, exp, overrides, seeds, runs_root, runner)
                   for exp in proto.experiments}
    finally:
        for h in helpers:
            h.join(timeout=60)
            if h.is_alive():
                h.terminate()
    if not runner.complete:
        print(f"reproduce {proto.name}: some cells are held by other workers; run again to "
              "wait for them (--no-wait was given)")
        return 0
    measures = _measure_all(proto, results, args.quiet)
    command = "flatminima reproduce " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["reproduce"]
                                                 else [args.name, f"--scale {args.scale}"])
    text = write_report(out, proto, results, measures, seeds, command)
    print(text, end="")
    return 0


def _measure_all(proto: Protocol, results: Mapping[str, list[SearchResult]], quiet: bool
                 ) -> dict[tuple[str, str, str], list[dict[str, float]]]:
    """(experiment, search, label) -> the measurements of each seed's run of the selection."""
    if not proto.measure:
        return {}
    todo = [(exp, sr.search, label, r, sr.configs[r.cell.key])
            for exp, searches in results.items() for sr in searches
            for label, s in sr.best.items() for r in s.results
            if r.metrics.get("status") == "ok"]
    # A run trained on another host that shares only the study has no folder here.
    away = [cfg.out for *_, cfg in todo if not (Path(cfg.out) / "last.pt").is_file()]
    if away:
        print(f"reproduce {proto.name}: {len(away)} selected run(s) have no checkpoint on this "
              f"host (first: {away[0]}); their measurements are left out. Give every worker "
              "one shared --runs folder, or report from the host that trained them.",
              file=sys.stderr)
    out: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for exp, search, label, _r, cfg in progress(todo, desc="measure", quiet=quiet, unit="run",
                                                leave=False):
        if cfg.out not in away:
            out.setdefault((exp, search, label), []).append(measure_cell(cfg, proto.measure))
    return out


def _run_command(proto: Protocol, args: argparse.Namespace, overrides: Mapping[str, Any]) -> int:
    """A protocol that is another command of the CLI (the generalization study)."""
    from flatminima.experiment.cli import main

    argv = list(proto.command)
    out = args.out or f"reports/reproduce/{proto.name}-{proto.scale}"
    if "--out" not in argv:
        argv += ["--out", out]
    if args.seeds:
        argv += ["--seeds", args.seeds]
    if overrides:
        raise ConfigError(f"protocol {proto.name!r} runs {' '.join(proto.command[:2])}: it takes "
                          "no key=value overrides")
    status = main(argv)
    report = Path(out) / "report.md"
    if status == 0 and report.is_file():
        from flatminima.experiment.checkpoint import atomic_write_text

        head = [f"Reproduced with `flatminima reproduce {proto.name} --scale {proto.scale}` "
                f"(`flatminima {' '.join(argv)}`); scale **{proto.scale}** "
                f"({proto.hours.get(proto.scale, 'time not stated')})."]
        if proto.reduces:
            head.append(f"What this scale reduces: {proto.reduces}.")
        atomic_write_text(report, " ".join(head) + "\n\n" + report.read_text())
    return status


# ----------------------------------------------------------------------------- torchrun

def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _run_distributed(proto: Protocol, args: argparse.Namespace, overrides: Mapping[str, Any],
                     seeds: Sequence[int], runs_root: Path, out: Path, url: str) -> int:
    """Every rank trains each cell together: rank 0 claims it and broadcasts its config."""
    import torch
    import torch.distributed as dist

    from flatminima.experiment.config import config_from_dict
    from flatminima.study.reproduce_report import write_report

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank()
    try:
        if rank != 0:
            while True:
                box: list[Any] = [None]
                dist.broadcast_object_list(box, src=0)
                if box[0] is None:
                    return 0
                _run_cell(config_from_dict(box[0]))

        def together(cfg: Config) -> dict[str, Any]:
            dist.broadcast_object_list([cfg.to_dict()], src=0)
            return _run_cell(cfg)

        runner = Runner(url, quiet=args.quiet, wait=True, grace=args.grace, objective=together)
        results = {exp.label: run_experiment(proto, exp, overrides, seeds, runs_root, runner)
                   for exp in proto.experiments}
        dist.broadcast_object_list([None], src=0)
        measures = _measure_all(proto, results, args.quiet)
        text = write_report(out, proto, results, measures, seeds,
                            f"torchrun ... flatminima reproduce {args.name} --scale {args.scale}")
        print(text, end="")
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)
