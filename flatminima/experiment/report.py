"""Results tables: mean ± std over seeds per setting, best setting per group, atomic report folders.

The paper's protocol (Zhao & Zhang 2022, Sec. 4): for each method, a grid over hyperparameters,
each setting trained with several seeds; the method's result is the setting with the best mean of
the selection metric, reported as mean ± std over its seeds. Here the selection metric is the
validation accuracy by default (a split carved from the training set), never the test accuracy
unless the user asks for it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:    # annotations only: the study imports fmt_pm without Optuna
    from flatminima.experiment.engine import CellResult


@dataclass
class SettingSummary:
    """All seeds of one setting: ``values[metric]`` lists one value per seed (NaN if diverged)."""

    setting: dict[str, Any]
    seeds: list[int] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    diverged: int = 0
    results: list[CellResult] = field(default_factory=list)

    def mean(self, metric: str) -> float:
        v = [x for x in self.values.get(metric, []) if math.isfinite(x)]
        return float(np.mean(v)) if v and len(v) == len(self.seeds) else math.nan

    def std(self, metric: str) -> float:
        """Sample standard deviation (ddof=1) over seeds; 0 for one seed."""
        v = [x for x in self.values.get(metric, []) if math.isfinite(x)]
        if not v or len(v) != len(self.seeds):
            return math.nan
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def summarize(results: Iterable[CellResult], metrics: Sequence[str]) -> list[SettingSummary]:
    """Group finished cells by setting (everything but the seed)."""
    groups: dict[str, SettingSummary] = {}
    for r in sorted(results, key=lambda r: (r.cell.setting_key, r.cell.seed)):
        s = groups.setdefault(r.cell.setting_key, SettingSummary(r.cell.params))
        s.seeds.append(r.cell.seed)
        s.results.append(r)
        diverged = r.metrics.get("status") == "diverged"
        s.diverged += diverged
        for m in metrics:
            v = r.metrics.get(m)
            s.values.setdefault(m, []).append(
                math.nan if diverged or not isinstance(v, int | float) else float(v))
    return list(groups.values())


def best_per_group(summaries: Sequence[SettingSummary], group: Callable[[dict[str, Any]], str],
                   select: str) -> dict[str, SettingSummary]:
    """For each group (e.g. method), the setting with the best mean ``select`` over seeds.
    A setting with a diverged seed has no mean and is never selected."""
    best: dict[str, SettingSummary] = {}
    for s in summaries:
        g = group(s.setting)
        score = s.mean(select)
        if not math.isfinite(score):
            best.setdefault(g, s)
            continue
        current = best.get(g)
        if current is None or not math.isfinite(current.mean(select)) \
                or score > current.mean(select):
            best[g] = s
    return best


def fmt_pm(mean: float, std: float, digits: int | str = 2, *, missing: str = "diverged") -> str:
    """``"mean ± std"``: the one formatter of mean ± std in the project's tables and reports.

    ``digits`` is the number of decimals of both numbers, or a format spec (``".0f"``,
    ``".2e"``). A non-finite ``mean`` gives ``missing`` (``"diverged"``: a seed diverged;
    ``"n/a"``: nothing to average); a NaN ``std`` (one value, no spread) gives the mean alone.
    """
    if not math.isfinite(mean):
        return missing
    spec = f".{digits}f" if isinstance(digits, int) else digits
    if math.isnan(std):
        return format(mean, spec)
    return f"{format(mean, spec)} ± {format(std, spec)}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target`` whole, on
    error it is removed, so ``target`` is never left half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old.{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def settings_rows(summaries: Sequence[SettingSummary], metrics: Sequence[str]
                  ) -> tuple[list[str], list[list[Any]]]:
    """Every setting with mean and std of each metric (for a full CSV of a sweep)."""
    keys: list[str] = []
    for s in summaries:
        keys += [k for k in s.setting if k not in keys]
    header = keys + ["seeds", "diverged"] + [f"{m}_{x}" for m in metrics for x in ("mean", "std")]
    rows = []
    for s in summaries:
        row: list[Any] = [s.setting.get(k, "") for k in keys] + [len(s.seeds), s.diverged]
        for m in metrics:
            row += [_num(s.mean(m)), _num(s.std(m))]
        rows.append(row)
    return header, rows


def _num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else ""


def describe(setting: Mapping[str, Any], skip: Iterable[str] = ("method",)) -> str:
    skip = set(skip)
    return ", ".join(f"{k}={v}" for k, v in setting.items() if k not in skip) or "-"
