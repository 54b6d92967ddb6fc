"""A study shared through a real PostgreSQL server: workers that share nothing but the database.

``FLATMINIMA_TEST_POSTGRES`` names the server (a SQLAlchemy URL); ``.ci/run`` starts one on
localhost with ``.ci/postgres``. Each test makes its own database on it, so tests never see each
other's studies. Without the variable the tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import optuna
import pytest

from flatminima.experiment.cells import Cell, expand
from flatminima.experiment.engine import GridWorker

SERVER = os.environ.get("FLATMINIMA_TEST_POSTGRES")
pytestmark = pytest.mark.skipif(not SERVER, reason="FLATMINIMA_TEST_POSTGRES is not set "
                                "(.ci/run starts a PostgreSQL server and sets it)")


@pytest.fixture
def database() -> str:
    """A fresh, empty database on the server; dropped afterwards."""
    import sqlalchemy as sa

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(_driver(SERVER), isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = _driver(SERVER).rsplit("/", 1)[0] + f"/{name}"
    yield url
    sa.create_engine(url).dispose()
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _driver(url: str) -> str:
    return "postgresql+psycopg://" + url.split("://", 1)[1] if url.startswith("postgresql://") \
        else url


def test_concurrent_workers_claim_each_cell_once(database):
    cells = expand({"lr": [0.1, 0.2, 0.3, 0.4, 0.5]}, range(4))
    ran: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def objective(cell: Cell) -> dict:
        with lock:
            ran.append(cell.key)
        return {"val_acc": float(cell.seed), "status": "ok"}

    def work() -> None:
        try:  # one connection pool per worker, as on separate machines
            GridWorker(database, "shared", poll_s=0.05).run(cells, objective)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(ran) == sorted(c.key for c in cells)
    trials = optuna.load_study(study_name="shared", storage=database).get_trials()
    assert sorted(t.user_attrs["cell"] for t in trials) == sorted(c.key for c in cells)


def test_two_hosts_share_one_reproduce_study(database, tmp_path):
    """Two `reproduce` processes with separate working folders and run folders (two machines)
    and one PostgreSQL study: every cell is trained once in all, and both print one report."""
    procs, hosts = [], [tmp_path / "host-a", tmp_path / "host-b"]
    for host in hosts:
        host.mkdir()
        cmd = [sys.executable, "-m", "flatminima", "reproduce", "nrs-table1", "--scale", "smoke",
               "--storage", database, "--runs", "runs", "--out", "report", "-q"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(cmd, cwd=host, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = Counter()
    for host in hosts:
        trained.update(p.parent.name for p in Path(host, "runs").rglob("metrics.json"))
    studies = optuna.get_all_study_summaries(storage=database)
    keys = [(s.study_name, t.user_attrs["cell"])
            for s in studies for t in optuna.load_study(study_name=s.study_name,
                                                        storage=database).get_trials()]
    assert keys and len(keys) == len(set(keys))  # each cell recorded once in the shared study
    # No cell trained twice (a setting that two searches share may be trained once per search
    # when the hosts share no run folder).
    assert 0 < sum(trained.values()) <= len(keys), trained
    reports = [(host / "report" / "report.md").read_text() for host in hosts]
    table = [r.split("\n## ", 1)[1] for r in reports]
    assert table[0] == table[1]  # both hosts report the same numbers, from the shared study
