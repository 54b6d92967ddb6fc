"""The generalization-visualization study as one function: tune, train, measure.

For one :class:`~flatminima.study.tasks.Task` (two spirals or an MNIST subset):

1. **Tune** the Adam learning rate of every method on the same grid: train on the ``fit`` part of
   the training set, score on the held-out ``val`` part (mean validation accuracy over the tuning
   seeds, ties broken by validation loss). This is the "Fair comparison" protocol of the design:
   NRS's objective sums two cross-entropies, so at one shared learning rate it would take larger
   steps than Baseline and win for that reason alone (with Adam the effect is smaller, since Adam
   divides by the gradient scale, but the tuning removes it either way).
2. **Train** on the full training set, for every seed: Baseline at its tuned rate with each poison
   factor (factor 0 is the clean model), and every method at its tuned rate on clean data.
3. **Measure** each model: train/test accuracy and gap; basin radius, log-volume and rollouts of the
   clean training loss (:mod:`flatminima.study.measure`); for the spirals the decision boundary
   and the input-space margin of every training point (:mod:`flatminima.study.boundary`).

Jobs are independent and deterministic given their seed, so they can run in worker processes
(``workers > 1``; one thread each) with the same results as a serial run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flatminima.methods import create_method, list_methods
from flatminima.study.boundary import decision_grid, input_margins
from flatminima.study.measure import basin_stats, rollouts
from flatminima.study.model import mnist_mlp, spiral_mlp
from flatminima.study.poison import PoisonedLoss, poison_targets
from flatminima.study.tasks import Task
from flatminima.study.train import accuracy, train_full_batch

#: Tuning seed ``s`` initializes and perturbs its model with seed ``TUNE_SEED_OFFSET + s``.
TUNE_SEED_OFFSET = 1000


@dataclass
class StudyConfig:
    """Grid and measurement settings of one study run (defaults: the two-spirals study)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    poison_factors: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3)
    methods: tuple[str, ...] = ("baseline", "rpr", "nrs", "sam", "nso")
    lr_grid: tuple[float, ...] = (0.002, 0.005, 0.01)
    tune_seeds: tuple[int, ...] = (0,)
    steps: int = 4000
    cutoffs: tuple[float, ...] = (0.1, 0.5, 1.0)
    num_directions: int = 50
    rollout_directions: int = 10
    rollout_span: float = 0.25
    rollout_points: int = 51
    grid_resolution: int = 400
    grid_extent: float = 18.0
    workers: int = 1
    method_hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    def validate(self) -> None:
        known = set(list_methods())
        for m in self.methods:
            if m not in known:
                raise ValueError(f"unknown method {m!r}; choose from {', '.join(sorted(known))}")
        if "baseline" not in self.methods:
            raise ValueError("methods must include 'baseline' (the poisoned models are trained "
                             "with it, at its tuned learning rate)")
        for name, value in (("seeds", self.seeds), ("lr_grid", self.lr_grid),
                            ("poison_factors", self.poison_factors), ("cutoffs", self.cutoffs),
                            ("tune_seeds", self.tune_seeds)):
            if len(value) == 0:
                raise ValueError(f"{name} must not be empty")
        if any(not (f >= 0 and math.isfinite(f)) for f in self.poison_factors):
            raise ValueError(f"poison factors must be finite and >= 0, got {self.poison_factors}")
        if any(not (lr > 0 and math.isfinite(lr)) for lr in self.lr_grid):
            raise ValueError(f"learning rates must be finite and > 0, got {self.lr_grid}")
        if any(not c > 0 for c in self.cutoffs):
            raise ValueError(f"cutoffs must be > 0, got {self.cutoffs}")
        for name in ("steps", "num_directions", "rollout_directions", "rollout_points",
                     "workers"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class Job:
    """One model to train: ``phase`` is ``"tune"`` (fit/val split) or ``"final"`` (train/test)."""

    phase: str
    method: str
    lr: float
    seed: int
    poison_factor: float = 0.0


def make_model(kind: str, seed: int) -> nn.Module:
    """The study's network for ``kind`` ("spirals" or "mnist"), initialized from ``seed``."""
    if kind == "spirals":
        return spiral_mlp(seed=seed)
    if kind == "mnist":
        return mnist_mlp(seed=seed)
    raise ValueError(f"unknown study kind {kind!r}")


def _plain(value: Any) -> Any:
    """JSON-friendly copy of a hyperparameter value."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return repr(value)


def run_job(job: Job, task: Task, cfg: StudyConfig) -> dict[str, Any]:
    """Train one model and measure it; returns a JSON-friendly record."""
    start = time.perf_counter()
    model = make_model(task.kind, job.seed)
    x, y = task.fit if job.phase == "tune" else (task.x_train, task.y_train)
    if job.poison_factor > 0:
        inputs = torch.cat([x, task.x_poison])
        targets = torch.cat([y, poison_targets(task.y_poison)])
    else:
        inputs, targets = x, y
    method = create_method(job.method, **cfg.method_hparams.get(job.method, {}))
    log = train_full_batch(model, inputs, targets, steps=cfg.steps, lr=job.lr, method=method,
                           loss_fn=PoisonedLoss(job.poison_factor), seed=job.seed)
    rec: dict[str, Any] = asdict(job)
    rec["hparams"] = {k: _plain(v) for k, v in method.hparams().items()}
    rec["diverged"] = log.diverged
    rec["final_objective"] = log.loss[-1] if log.loss else float("nan")
    if job.phase == "tune":
        xv, yv = task.val
        with torch.no_grad():
            rec["val_loss"] = float(F.cross_entropy(model(xv), yv))
        rec["val_acc"] = accuracy(model, xv, yv)
        rec["seconds"] = time.perf_counter() - start
        return rec
    rec.update(_measure(model, task, cfg, job))
    rec["seconds"] = time.perf_counter() - start
    return rec


def _measure(model: nn.Module, task: Task, cfg: StudyConfig, job: Job) -> dict[str, Any]:
    x, y = task.x_train, task.y_train
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["train_loss"] = float(F.cross_entropy(model(x), y))
        out["test_loss"] = float(F.cross_entropy(model(task.x_test), task.y_test))
    out["train_acc"] = accuracy(model, x, y)
    out["test_acc"] = accuracy(model, task.x_test, task.y_test)
    out["gap"] = out["train_acc"] - out["test_acc"]
    out["basin"] = {
        str(c): asdict(basin_stats(model, x, y, cutoff=c, num_directions=cfg.num_directions,
                                   seed=10_000 + job.seed))
        for c in cfg.cutoffs
    }
    if job.seed == cfg.seeds[0]:
        t, loss = rollouts(model, x, y, num_directions=cfg.rollout_directions,
                           span=cfg.rollout_span, num_points=cfg.rollout_points,
                           seed=20_000 + job.seed)
        out["rollout"] = {"t": t.tolist(), "loss": loss.tolist()}
    if task.kind == "spirals":
        grid = decision_grid(model, extent=cfg.grid_extent, resolution=cfg.grid_resolution)
        margins = input_margins(grid, x, y)
        finite = margins[np.isfinite(margins)]
        out["margin_mean"] = float(finite.mean()) if finite.size else float("nan")
        out["margin_median"] = float(np.median(finite)) if finite.size else float("nan")
        out["margin_q10"] = float(np.quantile(finite, 0.1)) if finite.size else float("nan")
        if job.seed == cfg.seeds[0]:
            out["grid"] = {"coords": grid.coords.tolist(), "prob": grid.prob.astype(np.float32)}
    return out


def _worker_init() -> None:
    torch.set_num_threads(1)


def _run_all(jobs: list[Job], task: Task, cfg: StudyConfig,
             log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run ``jobs`` (serially or in ``cfg.workers`` spawned processes), in input order."""
    results: list[dict[str, Any]] = []
    if cfg.workers == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for i, job in enumerate(jobs):
                results.append(run_job(job, task, cfg))
                log(_describe(i, len(jobs), results[-1]))
        finally:
            torch.set_num_threads(threads)
        return results
    with ProcessPoolExecutor(cfg.workers, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        futures = [pool.submit(run_job, job, task, cfg) for job in jobs]
        for i, fut in enumerate(futures):
            results.append(fut.result())
            log(_describe(i, len(jobs), results[-1]))
    return results


def _describe(i: int, n: int, rec: dict[str, Any]) -> str:
    head = (f"[{i + 1}/{n}] {rec['phase']} {rec['method']} lr={rec['lr']:g} seed={rec['seed']} "
            f"poison={rec['poison_factor']:g}")
    if rec["phase"] == "tune":
        return f"{head}: val acc {rec['val_acc']:.3f} ({rec['seconds']:.0f}s)"
    return (f"{head}: train {rec['train_acc']:.3f} test {rec['test_acc']:.3f} "
            f"({rec['seconds']:.0f}s)")


def select_lr(tune: list[dict[str, Any]]) -> dict[str, float]:
    """Per method, the grid learning rate with the best mean validation accuracy over tuning
    seeds (ties: lowest mean validation loss, then the smaller rate). Diverged runs score 0."""
    scores: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for r in tune:
        acc = 0.0 if r["diverged"] else r["val_acc"]
        loss = math.inf if r["diverged"] or not math.isfinite(r["val_loss"]) else r["val_loss"]
        scores.setdefault(r["method"], {}).setdefault(r["lr"], []).append((acc, loss))
    best: dict[str, float] = {}
    for method, by_lr in scores.items():
        def key(lr: float, by_lr: dict = by_lr) -> tuple[float, float, float]:
            accs, losses = zip(*by_lr[lr], strict=True)
            return (-float(np.mean(accs)), float(np.mean(losses)), lr)
        best[method] = min(by_lr, key=key)
    return best


def run_study(task: Task, cfg: StudyConfig, log: Callable[[str], None] = print
              ) -> dict[str, Any]:
    """Tune, train and measure (see the module doc). Returns ``{"config", "tune", "lr",
    "models", "seconds"}`` with one record per trained model under ``"models"``."""
    cfg.validate()
    start = time.perf_counter()
    # Tuning runs get seeds of their own, so no final model repeats a tuning run's draws.
    tune_jobs = [Job("tune", m, lr, TUNE_SEED_OFFSET + s) for m in cfg.methods
                 for lr in cfg.lr_grid for s in cfg.tune_seeds]
    log(f"{task.kind}: tuning {len(cfg.methods)} methods on {len(cfg.lr_grid)} learning rates")
    tune = _run_all(tune_jobs, task, cfg, log)
    lrs = select_lr(tune)
    log(f"{task.kind}: tuned learning rates {lrs}")
    final_jobs = [Job("final", "baseline", lrs["baseline"], s, f)
                  for f in cfg.poison_factors for s in cfg.seeds]
    final_jobs += [Job("final", m, lrs[m], s) for m in cfg.methods if m != "baseline"
                   for s in cfg.seeds]
    if 0.0 not in cfg.poison_factors:      # the clean Baseline models anchor the comparison
        final_jobs += [Job("final", "baseline", lrs["baseline"], s) for s in cfg.seeds]
    models = _run_all(final_jobs, task, cfg, log)
    cfg_dict = asdict(cfg)
    return {"kind": task.kind, "config": cfg_dict, "tune": tune, "lr": lrs, "models": models,
            "seconds": time.perf_counter() - start,
            "num_params": sum(p.numel() for p in make_model(task.kind, 0).parameters()),
            "sizes": {"train": len(task.y_train), "test": len(task.y_test),
                      "poison": len(task.y_poison), "val": task.num_val}}


__all__ = ["StudyConfig", "Job", "make_model", "run_job", "select_lr", "run_study"]
