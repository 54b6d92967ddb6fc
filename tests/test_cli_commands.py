"""End-to-end runs of every command on tiny settings (seconds each)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import flatminima as fm
from flatminima.experiment import cli
from flatminima.experiment.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["dataset=digits", "model=mlp", "model.widths=[8]", "threads=1"]
PNG = b"\x89PNG\r\n\x1a\n"


def test_train_from_yaml_with_overrides_saves_resolved_config(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("dataset: digits\nmodel: mlp\nmodel_args: {widths: [8]}\nmethod: nrs\n"
                 "hparams: {rho: 0.1}\nepochs: 3\noptimizer: adamw\nlr: 0.01\n"
                 "schedule: step\nwarmup_epochs: 1\nlabel_smoothing: 0.1\n")
    out = tmp_path / "run"
    assert main(["train", str(f), "alpha=0.5", "epochs=2", f"out={out}", "-q", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["hparams"] == {"rho": 0.1, "alpha": 0.5} and saved["epochs"] == 2
    assert saved["optimizer"] == "adamw" and saved["momentum"] == 0.9  # defaults filled in
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert float(rows[-1]["test_acc"]) == pytest.approx(metrics["test_acc"])
    assert any((out / "tb").iterdir())  # TensorBoard events
    # Run again: finished, so it returns the stored metrics without training.
    assert main(["train", str(f), "alpha=0.5", "epochs=2", f"out={out}", "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == metrics["test_acc"]


def test_measure_writes_numbers_and_plots(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "epochs=1", "tensorboard=false", f"out={run}", "-q"]) == 0
    assert main(["measure", str(run), "--examples", "200", "--k", "2", "--starts", "2",
                 "--trace-matvecs", "12", "--samples", "3", "--line", "7", "--plane", "5",
                 "--basin", "3", "-q"]) == 0
    res = json.loads((run / "measure" / "measures.json").read_text())
    assert len(res["hessian_eigenvalues"]) == 2 and res["hessian_starts"] == 2
    assert res["hessian_start"] == "auto"
    assert res["hessian_eigenvalues"][0] >= res["hessian_eigenvalues"][1]
    assert res["divergence"] >= 0 and res["hessian_trace"] > 0
    assert len(res["line"]["loss"]) == 7 and len(res["plane"]["loss"]) == 5
    # the line passes through the trained weights: its middle point is the clean loss
    for name in ("landscape_1d.png", "landscape_2d.png"):
        assert (run / "measure" / name).read_bytes()[:8] == PNG
    assert "measurements and plots" in capsys.readouterr().out


def test_measure_checks_the_output_folder_before_measuring(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main(["train", *TINY, "epochs=1", "tensorboard=false", f"out={run}", "-q"]) == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the output folder's parent should be

    def must_not_run(*a, **k):
        raise AssertionError("measured before the output folder was checked")

    monkeypatch.setattr("flatminima.hessian.eigenvalues", must_not_run)
    assert main(["measure", str(run), "--out", str(blocker / "sub" / "m"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]


def test_compare_tiny_writes_table_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["compare", *TINY, "--methods", "nrs", "--lrs", "0.05,0.2", "--seeds", "2",
            "--epochs", "2", "--runs", str(tmp_path / "runs"), "--out", str(out),
            "--workers", "1", "--measure-examples", "100", "-q"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "by mean validation accuracy" in text and "test set never used" in text
    rows = list(csv.DictReader(open(out / "table.csv")))
    assert [r["method"] for r in rows] == ["NRS", "NRS alpha=0", "NRS rho=0"]
    assert all("±" in r["test acc"] and r["lr"].split()[0] in ("0.05", "0.2") for r in rows)
    for name in ("test_accuracy_curves.png", "final_accuracy.png", "hessian_top.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / "table.md").read_text().count("\n|") >= 4
    # A second compare reuses every finished run (nothing retrained) and rewrites the report.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/last.pt")}
    assert len(stamps) == 12
    assert main(argv) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_default_config_file_matches_embedded_default():
    from flatminima.experiment.compare import default_config_values

    assert yaml.safe_load((ROOT / "configs" / "compare.yaml").read_text()) \
        == default_config_values()


def test_missing_subcommand_module_breaks_only_itself(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(cli.SUBCOMMANDS, "study", "flatminima.no_such_module")
    assert main(["study"]) == 2
    assert "command 'study' is unavailable" in capsys.readouterr().err
    assert main(["train", *TINY, "epochs=1", "tensorboard=false", f"out={tmp_path / 'r'}",
                 "-q"]) == 0


def test_version_and_module_entry_point():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flatminima", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(path):
    import argparse

    from flatminima.experiment.compare import make_plan
    from flatminima.experiment.config import load_config
    from flatminima.experiment.sweep import load_plan

    if path.name.startswith("sweep"):
        assert load_plan(str(path), [], [], None)[1]
    elif path.name.startswith("compare"):
        args = argparse.Namespace(items=[str(path)], methods=None, lrs=None, seeds=None,
                                  epochs=None, no_controls=False)
        plan = make_plan(args)
        assert "NRS rho=0" in plan.variants
        if path.name == "compare.yaml":
            assert len(plan.cells()) == 72
        else:  # the kept comparison of every method: none left out
            shipped = {n for n in fm.list_methods()  # not a test's own registered example
                       if fm.methods.method_class(n).__module__.startswith("flatminima.")}
            assert {v["method"] for v in plan.variants.values()} == shipped
    else:
        assert load_config(path).epochs >= 1


def test_amp_dtype_picks_autocast_and_scaler_and_keeps_old_fingerprints(tmp_path, capsys):
    import torch

    from flatminima.experiment.config import Config
    from flatminima.experiment.train import autocast_dtype

    assert autocast_dtype("auto", "cuda") == torch.float16
    assert autocast_dtype("auto", "cpu") == torch.bfloat16
    assert autocast_dtype("bfloat16", "cuda") == torch.bfloat16
    assert Config().fingerprint() == Config(amp_dtype="auto").fingerprint()
    assert Config().fingerprint() != Config(amp_dtype="bfloat16").fingerprint()
    out = tmp_path / "fp16"  # float16 autocast on the CPU, with a GradScaler as on CUDA
    assert main(["train", *TINY, "epochs=1", "amp=true", "amp_dtype=float16", "method=nrs",
                 "tensorboard=false", f"out={out}", "-q", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["epoch"] == 1 and metrics["train_loss"] < 10


def test_train_with_amp_and_sam_runs_to_the_end(tmp_path, capsys):
    out = tmp_path / "amp"
    assert main(["train", *TINY, "epochs=1", "amp=true", "method=sam", "grad_clip=5",
                 "tensorboard=false", f"out={out}", "-q", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["epoch"] == 1 and metrics["train_loss"] < 10
