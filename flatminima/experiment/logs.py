"""Per-epoch metric logs (CSV and TensorBoard) and progress bars.

The CSV is rewritten atomically from the full history each epoch, so after a resume it holds
exactly the epochs of the checkpoint the run restarted from (no duplicated or orphan rows).
TensorBoard events of epochs after the resume point are purged by ``SummaryWriter(purge_step=)``.
"""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from flatminima.experiment.checkpoint import atomic_write_text


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` (dicts; columns in order of first appearance) atomically as CSV."""
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def read_csv(path: str | Path) -> list[dict[str, float | str]]:
    """Read a metrics CSV written by :func:`write_csv` (numbers parsed back to float)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        parsed: dict[str, float | str] = {}
        for k, v in row.items():
            try:
                parsed[k] = float(v)
            except (TypeError, ValueError):
                parsed[k] = v
        out.append(parsed)
    return out


class RunLogger:
    """Logs one row of scalar metrics per epoch to ``metrics.csv`` and TensorBoard.

    ``history`` is the list of rows so far (restored from a checkpoint on resume).
    """

    def __init__(self, out_dir: str | Path, history: Iterable[Mapping[str, Any]] = (), *,
                 tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, Any]] = [dict(r) for r in history]
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                self._tb = None
            else:
                self._tb = SummaryWriter(str(self.out_dir / "tb"),
                                         purge_step=len(self.history) + 1)

    def log(self, row: Mapping[str, Any]) -> None:
        row = dict(row)
        self.history.append(row)
        write_csv(self.out_dir / "metrics.csv", self.history)
        if self._tb is not None:
            step = int(row.get("epoch", len(self.history)))
            for k, v in row.items():
                if k != "epoch" and isinstance(v, int | float):
                    self._tb.add_scalar(k.replace("_", "/", 1), v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def progress(iterable: Iterable[Any] | None = None, *, total: int | None = None,
             desc: str | None = None, quiet: bool = False, leave: bool = False,
             unit: str = "it") -> tqdm:
    """A tqdm bar on stderr (rate, ETA); ``quiet`` disables it entirely."""
    return tqdm(iterable, total=total, desc=desc, disable=quiet, leave=leave, unit=unit,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
