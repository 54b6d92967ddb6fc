"""Every bad input ends with one line on stderr naming the problem, exit status 2, no traceback
and nothing written. This table is the list of bad inputs tried (the README shows it too)."""

from __future__ import annotations

import pytest
import torch

from flatminima.experiment.cli import main

TRAIN = ["train", "dataset=digits", "model=mlp", "model.widths=[4]", "epochs=1",
         "tensorboard=false"]

# (arguments, text the one-line message must contain)
BAD_INPUTS = [
    (["train", "dataset=nope"], "dataset='nope': unknown"),
    (["train", "model=nope"], "model='nope': unknown"),
    (["train", "method=nope"], "method='nope': unknown"),
    (["train", "lrr=0.1"], "unknown key 'lrr'"),
    (["train", "method=baseline", "rho=0.1"], "unknown key 'rho'"),
    (["train", "lr=-1"], "lr=-1.0: must be > 0"),
    (["train", "lr=abc"], "lr='abc': must be a number"),
    (["train", "lr=nan"], "lr=nan: must be finite"),
    (["train", "epochs=0"], "epochs=0: must be >= 1"),
    (["train", "epochs=1.5"], "epochs=1.5: must be an integer"),
    (["train", "batch_size=big"], "batch_size='big': must be an integer"),
    (["train", "method=nrs", "rho=-0.1"], "rho must be a finite number >= 0"),
    (["train", "optimizer=adam"], "optimizer='adam': unknown; choose one of sgd, adamw"),
    (["train", "schedule=linear"], "schedule='linear': unknown"),
    (["train", "momentum=1.5"], "momentum=1.5: must be < 1"),
    (["train", "label_smoothing=1"], "label_smoothing=1.0: must be < 1"),
    (["train", "amp=maybe"], "amp='maybe': must be true or false"),
    (["train", "amp_dtype=half"], "amp_dtype='half': unknown; choose one of auto, float16"),
    (["train", "device=tpu"], "device='tpu': unknown"),
    (["train", "val_split=1.5"], "val_split=1.5: must be < 1"),
    (["train", "warmup_epochs=9", "epochs=2"], "warmup_epochs=9.0: exceeds epochs=2"),
    (["train", "augment=rotate"], "augment='rotate': unknown"),
    (["train", "hparams=3"], "hparams=3: must be a mapping"),
    (["train", "lr"], "config file 'lr' not found"),
    (["train", "a.yaml", "b.yaml"], "argument 'b.yaml': expected key=value"),
    (["train", "{tmp}/missing.yaml"], "missing.yaml' not found"),
    (["train", "{tmp}/bad.yaml"], "malformed YAML at line 2"),
    (["train", "{tmp}/list.yaml"], "expected a mapping of key: value"),
    ([*TRAIN, "model.depth=3"], "model 'mlp': mlp() got an unexpected keyword argument 'depth'"),
    ([*TRAIN, "dataset=imagefolder", "data_root={tmp}/nodata"], "no image folder in"),
    ([*TRAIN, "out={tmp}/corrupt"], "is corrupted or not a checkpoint"),
    ([*TRAIN, "out={tmp}/foreign"], "has no saved config"),
    (["train", "--bogus"], "unrecognized arguments: --bogus"),
    (["nocommand"], "invalid choice: 'nocommand'"),
    (["measure", "{tmp}/nowhere"], "no checkpoint found"),
    (["measure", "{tmp}/garbage.pt"], "is corrupted or not a checkpoint"),
    (["measure", "{tmp}/plain.pt"], "is not a flatminima checkpoint"),
    (["measure", "{tmp}/garbage.pt", "--k", "0"], "--k=0: must be > 0"),
    (["measure", "{tmp}/garbage.pt", "--starts", "0"], "--starts=0: must be > 0"),
    (["sweep", "--seeds", "abc"], "seeds='abc'"),
    (["sweep", "--grid", "lr"], "--grid 'lr': expected key=v1,v2"),
    (["sweep", "{tmp}/sweep.yaml"], "unknown key 'grids'"),
    (["sweep", "--grid", "lr=0.1", "--select", "val_acc"], "needs val_split > 0"),
    (["sweep", "--grid", "lr=0.1,-1"], "lr=-1.0: must be > 0"),
    (["compare", "--methods", "foo"], "--methods: unknown method 'foo'"),
    (["compare", "--lrs", "0.1,-1"], "lrs='0.1,-1': need positive numbers"),
    (["compare", "val_split=0"], "val_split must be > 0 for compare"),
    (["compare", "rho=-1"], "rho must be a finite number >= 0"),
    (["compare", "--measure-examples", "0"], "--measure-examples=0: must be >= 1"),
    (["compare", "--methods", ","], "--methods=',': give at least one method"),
    (["compare", "--lrs", ""], "lrs='': need positive numbers"),
    (["sweep", "--grid", "rhoo=0.05,0.1"], "unknown key 'rhoo'"),
    (["sweep", "--grid", "lr=0.1", "--heartbeat", "-1"], "--heartbeat=-1.0: must be > 0"),
    (["sweep", "--grid", "lr=0.1", "--grace", "5"], "--grace=5.0: must exceed --heartbeat"),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "bad.yaml").write_text("lr: 0.1\n  epochs: [\n")
    (tmp_path / "list.yaml").write_text("- lr\n- epochs\n")
    (tmp_path / "sweep.yaml").write_text("grids: {lr: [0.1]}\n")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "last.pt").write_bytes(b"PK\x03\x04 truncated zip")
    (tmp_path / "foreign").mkdir()
    torch.save({"model": {"w": torch.ones(1)}}, tmp_path / "foreign" / "last.pt")
    return tmp_path


@pytest.mark.parametrize("argv,needle", BAD_INPUTS,
                         ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(argv, needle, files, capsys, monkeypatch):
    monkeypatch.chdir(files)  # anything wrongly written would land here
    before = sorted(p.name for p in files.iterdir())
    argv = [a.replace("{tmp}", str(files)) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        raise SystemExit(main(argv))
    out = capsys.readouterr()
    assert exit_.value.code == 2, out.err
    assert out.err.count("\n") == 1, out.err
    assert needle.replace("{tmp}", str(files)) in out.err, out.err
    assert "Traceback" not in out.err
    assert sorted(p.name for p in files.iterdir()) == before  # nothing written
    assert sorted(p.name for p in (files / "corrupt").iterdir()) == ["last.pt"]
