"""``flatminima reproduce``: the protocol files, their smoke runs, resume, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flatminima.experiment.cli import main
from flatminima.experiment.config import ConfigError
from flatminima.study import reproduce as rp
from flatminima.study.protocol import SCALES, list_protocols, load_protocol

ROOT = Path(__file__).resolve().parents[1]
PROTOCOLS = list_protocols()
EXPECTED = {"nrs-table1", "nrs-table2", "nrs-table3", "nrs-figure1", "smoothout", "nso",
            "generalization", "fair-comparison"}


def test_every_protocol_the_papers_need_is_shipped():
    assert EXPECTED <= set(PROTOCOLS)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("name", PROTOCOLS)
def test_every_protocol_parses_at_every_scale_and_validates(name, scale, tmp_path):
    proto = load_protocol(name, scale)
    assert proto.paper and proto.measures and scale in proto.hours
    if proto.kind == "command":
        assert proto.command[0] == "study"
        return
    assert proto.experiments and proto.search
    for exp in proto.experiments:
        base = rp.experiment_base(proto, exp, {})
        for search in proto.search:
            assert search in ("fair", "paper", "grid")
        # the experiment's config is valid (data files are not read here)
        rp.build_config({**base, "quiet": True, "out": str(tmp_path / "x")})
    if scale != "paper" and (proto.raw.get("scales") or {}).get(scale):
        assert proto.changes, "a reduced scale must say what it changes"


def test_table1_smoke_expands_to_the_cells_it_promises(tmp_path):
    proto = load_protocol("nrs-table1", "smoke")
    (exp,) = proto.experiments
    base = rp.experiment_base(proto, exp, {})
    variants = rp.fair_settings(proto.search["fair"])
    assert list(variants) == ["Baseline", "RPR", "NRS"]  # controls: false at smoke
    settings = [{**v, "lr": lr} for v in variants.values() for lr in proto.search["fair"]["lrs"]]
    stage = rp.make_stage("t", base, settings, proto.seeds, tmp_path, rp.label_for(variants))
    assert len(stage.cells) == 3 * 2 * 1
    cpu = load_protocol("nrs-table1", "cpu")
    assert list(rp.fair_settings(cpu.search["fair"])) == [
        "Baseline", "RPR", "NRS", "NRS alpha=0", "NRS rho=0"]
    paper = load_protocol("nrs-table1", "paper")
    assert len(paper.experiments) == 20
    assert len(rp._grid(paper.search["paper"]["baseline"])) == 3 * 2 * 2
    # The ViT experiments keep the paper's fixed Adam setting: only rho and alpha searched.
    vit = next(e for e in paper.experiments if "ViT" in e.label)
    assert vit.base["optimizer"] == "adamw" and vit.search["paper"]["baseline"] == {"lr": [0.001]}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_protocol_runs_at_smoke_scale(name, tmp_path):
    out = tmp_path / "report"
    status = main(["reproduce", name, "--scale", "smoke", "--runs", str(tmp_path / "runs"),
                   "--out", str(out), "-q"])
    assert status == 0
    report = (out / "report.md").read_text()
    assert "smoke" in report
    if load_protocol(name, "smoke").kind == "train":
        assert "mean ± std" in report and "Verdict" in report
        assert (out / "results.csv").is_file() and (out / "results.json").is_file()
        assert list(out.glob("*.png"))


def test_the_report_puts_the_papers_number_beside_ours(tmp_path):
    out = tmp_path / "report"
    assert main(["reproduce", "nrs-table3", "--scale", "smoke", "--runs", str(tmp_path / "r"),
                 "--out", str(out), "-q"]) == 0
    report = (out / "report.md").read_text()
    assert "49.15" in report and "51.79" in report and "2.42" in report
    assert "last-layer eig" in report and "Hessian trace" in report


def test_verdict_words_follow_the_seed_spread():
    from flatminima.study.reproduce_report import compare_to_baseline

    assert compare_to_baseline([90, 91, 92], [85, 86, 87]) == "beats"
    assert compare_to_baseline([85, 86, 87], [90, 91, 92]) == "loses"
    assert compare_to_baseline([90, 91, 92], [90.5, 91.5, 92.5]) == "matches"
    assert compare_to_baseline([90], [80]).startswith("higher than (one seed")


def test_a_killed_reproduce_resumes_and_runs_only_the_missing_cells(tmp_path, monkeypatch):
    runs, out = tmp_path / "runs", tmp_path / "out"
    cmd = [sys.executable, "-m", "flatminima", "reproduce", "nrs-table1", "--scale", "smoke",
           "--runs", str(runs), "--out", str(out), "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(runs.glob("*/*/metrics.json"))) < 2:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in runs.glob("*/*/metrics.json")}
    assert len(done) >= 2 and not (out / "report.md").exists()
    trained = []
    real = rp._run_cell

    def counting(cfg):
        before = (Path(cfg.out) / "metrics.json").is_file()
        result = real(cfg)
        if not before:
            trained.append(cfg.out)
        return result

    monkeypatch.setattr(rp, "_run_cell", counting)
    assert main(cmd[3:]) == 0
    total = list(runs.glob("*/*/metrics.json"))
    assert (out / "report.md").is_file()
    # The runs finished before the kill were not trained again; only the missing ones were.
    assert all(p.stat().st_mtime_ns == t for p, t in done.items())
    assert len(trained) == len(total) - len(done)


def test_one_run_folder_is_trained_by_one_worker_at_a_time(tmp_path, monkeypatch):
    """Two stages may plan the same run; two workers reaching it at once must not train it
    side by side in one folder."""
    import threading

    import flatminima.experiment.sweep as sweep
    from flatminima.experiment.config import build_config

    spans: list[tuple[float, float]] = []

    def slow_run(cfg):
        t0 = time.monotonic()
        time.sleep(0.3)
        spans.append((t0, time.monotonic()))
        return {"status": "ok"}

    monkeypatch.setattr(sweep, "run_cell", slow_run)
    cfg = build_config({"dataset": "digits", "model": "mlp", "out": str(tmp_path / "r" / "a")})
    threads = [threading.Thread(target=rp._run_cell, args=(cfg,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    spans.sort()
    assert len(spans) == 3
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # in turn


def test_an_edited_protocol_is_run_again_not_read_from_the_study(tmp_path):
    """The same grid point on another base (here 1 epoch instead of 2) is a new cell: the study
    of the first run must not answer for it."""
    args = ["reproduce", "nrs-table3", "--scale", "smoke", "--runs", str(tmp_path / "r"), "-q"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "epochs=1"]) == 0
    epochs = {json.loads(p.read_text())["epochs"]
              for p in (tmp_path / "r").glob("*/*/metrics.json")}
    assert epochs == {1, 2}
    first, second = ((tmp_path / d / "results.json").read_text() for d in "ab")
    assert first != second


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "nope"], "unknown protocol 'nope'"),
    (["reproduce", "nrs-table1", "--scale", "huge"], "unknown scale 'huge'"),
    (["reproduce"], "name a protocol"),
    (["reproduce", "nrs-table1", "--workers", "0", "--scale", "smoke"], "--workers=0"),
    (["reproduce", "nrs-table1", "--scale", "smoke", "lrr=0.1"], "unknown key 'lrr'"),
])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_protocol_file_with_an_unknown_key_is_refused(tmp_path, capsys):
    bad = tmp_path / "mine.yaml"
    bad.write_text((ROOT / "flatminima/study/protocols/nrs-table1.yaml").read_text()
                   + "\nlearning_rates: [0.1]\n")
    assert main(["reproduce", str(bad), "--scale", "smoke"]) == 2
    assert "unknown key 'learning_rates'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="scales.smoke: unknown key 'epochs'"):
        text = (ROOT / "flatminima/study/protocols/nrs-table1.yaml").read_text()
        bad.write_text(text.replace("  smoke:\n", "  smoke:\n    epochs: 3\n", 1))
        load_protocol(str(bad), "smoke")


def test_a_missing_data_set_is_one_line(tmp_path, capsys):
    status = main(["reproduce", "nrs-table1", "--scale", "cpu", "--runs", str(tmp_path / "r"),
                   "--out", str(tmp_path / "o"), "--data", str(tmp_path / "nodata"), "-q"])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nodata" in err


def test_list_names_every_protocol_and_its_hours(capsys):
    assert main(["reproduce", "--list"]) == 0
    text = capsys.readouterr().out
    for name in EXPECTED:
        assert name in text
    assert "2 CPU cores" in text


@pytest.mark.slow
def test_under_torchrun_every_rank_trains_the_same_cells(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29541", "-m", "flatminima",
         "reproduce", "nrs-table1", "--scale", "smoke", "--runs", str(tmp_path / "runs"),
         "--out", str(tmp_path / "out"), "-q"], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "report.md").is_file()
    # Two ranks, one copy of each run: rank 0 claimed, both trained it together.
    assert len(list((tmp_path / "runs").glob("*/*/metrics.json"))) == 6
