"""Run the cells of a sweep on an Optuna RDB study, shared safely by any number of workers.

Results live in an Optuna study (``optuna.storages.RDBStorage``: a SQLite file by default, or a
PostgreSQL / MySQL URL so that workers on many machines share one study). Each finished cell is one
trial: COMPLETE with the selection metric as its value, or PRUNED when the run diverged; its
setting, seed and metrics are trial user attributes (``optuna-dashboard`` and
``study.trials_dataframe()`` read them).

Optuna's samplers may hand the same grid point to two workers that start together, so cells are
claimed through one extra table in the same database, ``flatminima_cells`` with primary key
``(study_id, cell)``: a worker runs a cell only if its ``INSERT`` of the claim succeeded, which the
database grants to exactly one worker. A running worker refreshes its claim's heartbeat; a claim
whose heartbeat is older than ``grace_s`` (its worker was killed) is taken over with a
compare-and-set ``UPDATE ... WHERE owner = <old owner> AND heartbeat = <old heartbeat>``, again
granted to one worker only; a claim of a process on the same machine that no longer exists is
taken over at once. So a restarted sweep runs only the missing cells, and no cell is run twice at
once. (Heartbeats use each worker's wall clock: keep machine clocks in sync, within
``grace_s``.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from flatminima.experiment.cells import Cell
from flatminima.experiment.config import ConfigError

_CLAIMS = "flatminima_cells"


@dataclass
class CellResult:
    """A finished cell: its metrics (``status`` is ``"ok"`` or ``"diverged"``)."""

    cell: Cell
    metrics: dict[str, Any]


def storage_url(storage: str | None, default_path: str | Path) -> str:
    """A SQLAlchemy URL: given as is, a bare file name becomes ``sqlite:///<file>``."""
    if storage is None:
        storage = str(default_path)
    if "://" not in storage:
        path = Path(storage)
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if storage.startswith("sqlite:///"):
        Path(storage[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return storage


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage; SQLite waits for locks instead of failing when several workers write."""
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": 120}}
    last: Exception | None = None
    for attempt in range(5):  # two workers creating the tables at once may collide once
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except (OperationalError, IntegrityError, optuna.exceptions.StorageInternalError) as e:
            last = e
            time.sleep(0.2 * (attempt + 1))
        except ImportError:
            hint = " (pip install 'flatminima[postgres]')" if url.startswith("postgres") else ""
            raise ConfigError(f"storage {url!r}: its database driver is not installed{hint}"
                              ) from None
        except (ValueError, sa.exc.ArgumentError) as e:
            raise ConfigError(f"storage {url!r}: {' '.join(str(e).split())[:200]}") from None
    raise ConfigError(f"storage {url!r}: cannot open ({' '.join(str(last).split())[:200]})")


def _dead_local_owner(owner: str) -> bool:
    """True when ``owner`` (``host:pid:tag``) ran on this machine and its process is gone, so its
    claim can be taken over at once instead of after ``grace_s``."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


class GridWorker:
    """One worker of a sweep: claims free cells one at a time and runs them.

    ``objective(cell) -> metrics`` trains the cell (resuming its own checkpoint if a previous owner
    was killed) and returns a metrics dict; ``metrics["status"] == "diverged"`` records a diverged
    run. ``select`` names the metric stored as the trial value.
    """

    def __init__(self, storage: str, study_name: str, *, select: str = "val_acc",
                 heartbeat_s: float = 10.0, grace_s: float = 60.0, poll_s: float = 2.0) -> None:
        if not heartbeat_s > 0:
            raise ConfigError(f"heartbeat_s={heartbeat_s}: must be > 0")
        if grace_s <= heartbeat_s:
            raise ConfigError(f"grace_s={grace_s} must exceed heartbeat_s={heartbeat_s}")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.storage = open_storage(storage)
        self.study = optuna.create_study(study_name=study_name, storage=self.storage,
                                         direction="maximize", load_if_exists=True)
        self.study_id = self.study._study_id
        self.select = select
        self.heartbeat_s, self.grace_s, self.poll_s = heartbeat_s, grace_s, poll_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.engine: sa.Engine = self.storage.engine
        self._table = sa.Table(
            _CLAIMS, sa.MetaData(),
            sa.Column("study_id", sa.Integer, primary_key=True),
            sa.Column("cell", sa.String(2000), primary_key=True),
            sa.Column("owner", sa.String(200), nullable=False),
            sa.Column("heartbeat", sa.Float, nullable=False),
            sa.Column("done", sa.Integer, nullable=False, default=0),
        )
        self._retry(lambda: self._table.metadata.create_all(self.engine, checkfirst=True))

    # -- database helpers -------------------------------------------------------------------

    def _retry(self, fn: Callable[[], Any]) -> Any:
        for attempt in range(20):
            try:
                return fn()
            except OperationalError:  # SQLite "database is locked" under contention
                if attempt == 19:
                    raise
                time.sleep(0.05 * (attempt + 1))
            except IntegrityError:
                raise
        return None

    def claims(self) -> dict[str, dict[str, Any]]:
        t = self._table

        def read() -> dict[str, dict[str, Any]]:
            with self.engine.connect() as conn:
                rows = conn.execute(sa.select(t).where(t.c.study_id == self.study_id)).mappings()
                return {r["cell"]: dict(r) for r in rows}
        return self._retry(read)

    def _try_claim(self, cell: Cell, existing: dict[str, Any] | None) -> bool:
        t = self._table
        now = time.time()

        def claim() -> bool:
            with self.engine.begin() as conn:
                if existing is None:
                    try:
                        conn.execute(t.insert().values(study_id=self.study_id, cell=cell.key,
                                                       owner=self.owner, heartbeat=now, done=0))
                    except IntegrityError:
                        return False
                    return True
                res = conn.execute(t.update().where(
                    (t.c.study_id == self.study_id) & (t.c.cell == cell.key)
                    & (t.c.owner == existing["owner"]) & (t.c.heartbeat == existing["heartbeat"])
                    & (t.c.done == 0)).values(owner=self.owner, heartbeat=now))
                return res.rowcount == 1
        try:
            return bool(self._retry(claim))
        except IntegrityError:
            return False

    def _set(self, cell: Cell, **values: Any) -> None:
        t = self._table

        def update() -> None:
            with self.engine.begin() as conn:
                conn.execute(t.update().where(
                    (t.c.study_id == self.study_id) & (t.c.cell == cell.key)
                    & (t.c.owner == self.owner)).values(**values))
        self._retry(update)

    def _release(self, cell: Cell) -> None:
        t = self._table

        def delete() -> None:
            with self.engine.begin() as conn:
                conn.execute(t.delete().where(
                    (t.c.study_id == self.study_id) & (t.c.cell == cell.key)
                    & (t.c.owner == self.owner)))
        self._retry(delete)

    # -- results ----------------------------------------------------------------------------

    def results(self) -> dict[str, CellResult]:
        """Finished cells of the study by cell key (the first trial recorded for a cell wins)."""
        out: dict[str, CellResult] = {}
        trials = self.study.get_trials(deepcopy=False, states=(
            optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
        for tr in sorted(trials, key=lambda t: t.number):
            key = tr.user_attrs.get("cell")
            if key is None or key in out:
                continue
            cell = Cell(tuple(sorted(tr.user_attrs["setting"].items())),
                        int(tr.user_attrs["seed"]))
            out[key] = CellResult(cell, dict(tr.user_attrs["metrics"]))
        return out

    def _record(self, cell: Cell, metrics: dict[str, Any]) -> None:
        diverged = metrics.get("status") == "diverged"
        value = metrics.get(self.select)
        attrs = {"cell": cell.key, "setting": cell.params, "seed": cell.seed,
                 "metrics": json.loads(json.dumps(metrics, default=str)), "owner": self.owner}
        if diverged or value is None or value != value:
            trial = optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              user_attrs=attrs)
        else:
            trial = optuna.trial.create_trial(value=float(value), user_attrs=attrs)
        self._retry(lambda: self.study.add_trial(trial))

    # -- the loop ---------------------------------------------------------------------------

    def run(self, cells: Sequence[Cell], objective: Callable[[Cell], dict[str, Any]], *,
            wait: bool = True, on_done: Callable[[CellResult, bool], None] | None = None
            ) -> dict[str, CellResult]:
        """Run every free cell of ``cells``; with ``wait``, also wait for cells other workers
        hold (taking them over if their worker dies) until all are finished. Returns the
        finished results of ``cells``. ``on_done(result, ran_here)`` is called per cell."""
        keys = {c.key for c in cells}
        reported: set[str] = set()
        while True:
            claims = self.claims()
            done = {k for k, r in claims.items() if r["done"]}
            if on_done is not None:
                finished = self.results()
                for k in sorted(done & keys - reported):
                    if k in finished:
                        on_done(finished[k], False)
                        reported.add(k)
            pending = [c for c in cells if c.key not in done]
            if not pending:
                break
            now = time.time()
            ran = False
            for cell in pending:
                row = claims.get(cell.key)
                if row is not None and now - row["heartbeat"] <= self.grace_s \
                        and not _dead_local_owner(row["owner"]):
                    continue  # another worker holds it and is alive
                if not self._try_claim(cell, row):
                    continue
                metrics = self._run_claimed(cell, objective)
                result = CellResult(cell, metrics)
                if on_done is not None:
                    on_done(result, True)
                reported.add(cell.key)
                ran = True
                break  # re-read the claims: other workers progressed meanwhile
            if not ran:
                if not wait:
                    break
                time.sleep(self.poll_s)
        finished = self.results()
        return {k: v for k, v in finished.items() if k in keys}

    def _run_claimed(self, cell: Cell, objective: Callable[[Cell], dict[str, Any]]
                     ) -> dict[str, Any]:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                try:
                    self._set(cell, heartbeat=time.time())
                except Exception:  # a missed beat only risks a takeover after grace_s
                    pass
        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            metrics = objective(cell)
        except BaseException:
            stop.set()
            thread.join()
            self._release(cell)  # let a restart (or another worker) run it again
            raise
        stop.set()
        thread.join()
        self._record(cell, metrics)
        self._set(cell, done=1, heartbeat=time.time())
        return metrics
