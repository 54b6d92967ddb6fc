"""Sweeps: grid expansion, exactly-once cells across concurrent workers, restart, takeover,
and the paper's best-of-grid summary."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import optuna
import pytest

from flatminima.experiment.cells import Cell, expand, parse_grid_option, parse_seeds
from flatminima.experiment.cli import main
from flatminima.experiment.config import ConfigError
from flatminima.experiment.engine import CellResult, GridWorker
from flatminima.experiment.report import best_per_group, summarize

TINY = ["dataset=digits", "model=mlp", "model.widths=[8]", "epochs=1", "val_split=0.1",
        "tensorboard=false", "threads=1"]


def test_grid_applies_hparams_only_to_methods_that_take_them():
    cells = expand({"method": ["baseline", "nrs"], "lr": [0.1], "rho": [0.05, 0.1]}, [0, 1])
    settings = {c.setting_key for c in cells}
    assert len(cells) == 6  # baseline once per seed, nrs twice per seed
    assert json.dumps({"lr": 0.1, "method": "baseline"}, sort_keys=True) in settings
    assert all("rho" in c.params for c in cells if c.params["method"] == "nrs")


def test_grid_key_that_no_method_takes_is_an_error_not_dropped():
    with pytest.raises(ConfigError, match="rhoo"):
        expand({"method": ["baseline"], "rhoo": [0.05, 0.1]}, [0])
    with pytest.raises(ConfigError, match="rhoo"):
        expand([{"method": "nrs", "rhoo": 0.1}], [0], grid_kind="list")


def test_negative_heartbeat_is_a_usage_error(tmp_path, capsys):
    assert main(["sweep", *TINY, "--heartbeat", "-1", "--runs", str(tmp_path / "r"),
                 "-q"]) == 2
    assert "heartbeat" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_list_of_grids_and_explicit_list():
    union = expand([{"method": ["sam"], "rho": [0.05]}, {"method": ["nrs"], "alpha": [0, 1]}],
                   [0])
    assert [c.params for c in union] == [{"method": "sam", "rho": 0.05},
                                         {"alpha": 0, "method": "nrs"},
                                         {"alpha": 1, "method": "nrs"}]
    listed = expand([{"method": "nrs", "lr": 0.1}, {"method": "nrs", "lr": 0.1}], [0, 1],
                    grid_kind="list")
    assert len(listed) == 2  # duplicates collapse


def test_option_parsing():
    assert parse_grid_option(["lr=0.1,1e-2", "method=nrs"]) == {"lr": [0.1, 0.01],
                                                                 "method": ["nrs"]}
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("2-4") == [2, 3, 4]
    assert parse_seeds("0,5") == [0, 5]
    with pytest.raises(ConfigError):
        parse_seeds("x")


def _result(setting, seed, **metrics):
    return CellResult(Cell(tuple(sorted(setting.items())), seed), {"status": "ok", **metrics})


def test_best_of_grid_is_best_mean_with_sample_std():
    rs = [_result({"method": "nrs", "lr": 0.1}, 0, val_acc=80.0, test_acc=70.0),
          _result({"method": "nrs", "lr": 0.1}, 1, val_acc=84.0, test_acc=74.0),
          _result({"method": "nrs", "lr": 0.2}, 0, val_acc=90.0, test_acc=60.0),
          _result({"method": "nrs", "lr": 0.2}, 1, val_acc=70.0, test_acc=66.0),
          _result({"method": "sam", "lr": 0.1}, 0, val_acc=99.0, test_acc=1.0),
          {"status": "diverged"}]
    diverged = CellResult(Cell((("lr", 0.4), ("method", "sam")), 0), {"status": "diverged"})
    summaries = summarize([*rs[:5], diverged], ["val_acc", "test_acc"])
    best = best_per_group(summaries, lambda s: s["method"], "val_acc")
    nrs = best["nrs"]
    assert nrs.setting["lr"] == 0.1  # mean 82 beats mean 80, although one seed of 0.2 hit 90
    assert nrs.mean("test_acc") == 72.0
    assert nrs.std("test_acc") == pytest.approx(statistics.stdev([70.0, 74.0]))
    assert best["sam"].setting["lr"] == 0.1  # the diverged setting is never selected


def _count_runs(tmp_path, workers: int, cells: list[Cell], objective_sleep: float = 0.02):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    ran: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def objective(cell: Cell) -> dict:
        with lock:
            ran.append(cell.key)
        time.sleep(objective_sleep)
        return {"val_acc": float(cell.seed), "status": "ok"}

    def work() -> None:
        try:
            GridWorker(url, "s", poll_s=0.05).run(cells, objective)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return ran, url


def test_concurrent_workers_run_every_cell_exactly_once(tmp_path):
    cells = expand({"lr": [0.1, 0.2, 0.3, 0.4, 0.5]}, range(4))
    ran, url = _count_runs(tmp_path, 4, cells)
    assert sorted(ran) == sorted(c.key for c in cells)  # each once, none missing
    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert sorted(t.user_attrs["cell"] for t in trials) == sorted(c.key for c in cells)


def test_dead_workers_claim_is_taken_over_after_grace(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cells = expand({"lr": [0.1, 0.2]}, [0])
    dead = GridWorker(url, "s", heartbeat_s=0.1, grace_s=0.3)
    assert dead._try_claim(cells[0], None)  # claimed, then its process "dies"
    alive = GridWorker(url, "s", heartbeat_s=0.1, grace_s=0.3, poll_s=0.05)
    ran = []
    results = alive.run(cells, lambda c: ran.append(c.key) or {"val_acc": 1.0})
    assert sorted(ran) == sorted(c.key for c in cells) and len(results) == 2
    # A live claim is respected: with wait=False nothing is run twice.
    other = GridWorker(url, "s")
    assert other.run(cells, lambda c: pytest.fail("ran a finished cell"), wait=False)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # two fresh interpreters (torch, optuna imports): ~15-30 s on a loaded 2-core box
def test_two_cli_workers_on_one_sqlite_study(tmp_path):
    runs = tmp_path / "runs"
    cmd = [sys.executable, "-m", "flatminima", "sweep", *TINY, "--grid", "lr=0.05,0.1",
           "--grid", "method=baseline,nrs", "--seeds", "2", "--runs", str(runs), "--study", "two",
           "-q"]
    procs = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = optuna.load_study(study_name="two",
                               storage=f"sqlite:///{runs / 'study.db'}").get_trials()
    keys = [t.user_attrs["cell"] for t in trials]
    assert len(keys) == 8 and len(set(keys)) == 8  # 2 lr x 2 methods x 2 seeds, once each
    assert "best setting" in outs[0][0] and (runs / "report" / "best.md").is_file()


def test_restart_runs_only_missing_cells(tmp_path, capsys):
    runs = tmp_path / "runs"
    base = ["sweep", *TINY, "--seeds", "1", "--runs", str(runs), "--study", "r", "-q"]
    assert main([*base, "--grid", "lr=0.05,0.1"]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in runs.glob("run-s0-*")}
    assert main([*base, "--grid", "lr=0.05,0.1,0.2"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in runs.glob("run-s0-*")}
    assert len(after) == 3 and all(after[k] == v for k, v in stamps.items())
    trials = optuna.load_study(study_name="r", storage=f"sqlite:///{runs / 'study.db'}")
    assert len(trials.get_trials()) == 3
    assert "lr=0." in capsys.readouterr().out


def test_sweep_file_with_list_and_select(tmp_path, capsys):
    f = tmp_path / "s.yaml"
    f.write_text("base: {dataset: digits, model: mlp, model_args: {widths: [8]}, epochs: 1,\n"
                 "       val_split: 0.1, tensorboard: false, threads: 1}\n"
                 "list:\n  - {method: baseline, lr: 0.1}\n  - {method: nrs, lr: 0.1, rho: 0.1}\n"
                 "seeds: [0]\nselect: test_acc\n")
    assert main(["sweep", str(f), "--runs", str(tmp_path / "runs"), "-q"]) == 0
    out = capsys.readouterr().out
    assert "by mean test_acc" in out and "rho=0.1" in out


def test_claim_of_a_dead_local_process_is_taken_over_at_once(tmp_path):
    import socket

    url = f"sqlite:///{tmp_path / 'study.db'}"
    cells = expand({"lr": [0.1]}, [0])
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = GridWorker(url, "s", grace_s=1000.0)
    dead.owner = f"{socket.gethostname()}:{proc.stdout.strip()}:gone"
    assert dead._try_claim(cells[0], None)
    ran = []
    GridWorker(url, "s", grace_s=1000.0, poll_s=0.05).run(
        cells, lambda c: ran.append(c.key) or {"val_acc": 1.0})
    assert ran == [cells[0].key]


def test_report_folder_is_replaced_whole_or_not_at_all(tmp_path):
    from flatminima.experiment.report import atomic_dir

    target = tmp_path / "report"
    with atomic_dir(target) as tmp:
        (tmp / "a.md").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.md").write_text("half")
            raise RuntimeError("plotting failed")
    assert (target / "a.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temp folder left
    with atomic_dir(target) as tmp:
        (tmp / "b.md").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["b.md"]
