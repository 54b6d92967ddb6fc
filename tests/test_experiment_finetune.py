"""Fine-tuning: ``init_from`` (torchvision / timm state_dicts, flatminima checkpoints, run
folders), the head rule ``init_head``, ``init_strict``, ``body_lr`` and the run's identity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.cli import main
from flatminima.experiment.config import ConfigError, build_config
from flatminima.experiment.init import (
    from_torchvision_resnet,
    initialize,
    read_state_dict,
    to_torchvision_resnet,
)
from flatminima.experiment.train import lr_at, train
from flatminima.models import create_model
from tests._interrupt import train_interrupted

MLP = {"model": "mlp", "model.widths": [16], "epochs": 1, "batch_size": 64, "quiet": True,
       "tensorboard": False, "threads": 1}
HEAD = ("net.3.weight", "net.3.bias")  # the mlp's last layer


def _scramble_buffers(model):
    g = torch.Generator().manual_seed(1)
    for name, b in model.named_buffers():
        if b.is_floating_point():
            b.copy_(torch.rand(b.shape, generator=g) + (0.5 if "var" in name else 0.0))


# ----------------------------------------------------------------------------- torchvision names

def test_torchvision_resnet18_names_and_shapes():
    ours = create_model("resnet18", num_classes=1000, input_shape=(3, 224, 224), stem="imagenet")
    tv = to_torchvision_resnet(ours.state_dict())
    # torchvision.models.resnet18().state_dict(): 122 entries with these names and shapes
    assert len(tv) == 122
    assert tv["conv1.weight"].shape == (64, 3, 7, 7)
    assert tv["bn1.running_mean"].shape == (64,)
    assert tv["layer1.0.conv1.weight"].shape == (64, 64, 3, 3)
    assert tv["layer2.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert tv["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert tv["layer2.0.downsample.1.running_var"].shape == (128,)
    assert tv["layer4.1.bn2.running_var"].shape == (512,)
    assert tv["layer4.1.bn2.num_batches_tracked"].shape == ()
    assert tv["fc.weight"].shape == (1000, 512) and tv["fc.bias"].shape == (1000,)
    assert "layer1.0.downsample.0.weight" not in tv  # 64 -> 64, stride 1: identity shortcut
    assert not [k for k in tv if k.startswith(("stem.", "stages.", "head."))]
    back = from_torchvision_resnet(tv)
    assert list(back) == list(ours.state_dict())


def test_torchvision_resnet50_names_and_shapes():
    ours = create_model("resnet50", num_classes=1000)
    tv = to_torchvision_resnet(ours.state_dict())
    assert len(tv) == 320  # torchvision.models.resnet50().state_dict()
    assert tv["conv1.weight"].shape == (64, 3, 7, 7)
    assert tv["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert tv["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)  # v1.5: stride on the 3x3
    assert tv["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
    assert tv["layer4.2.bn3.running_mean"].shape == (2048,)
    assert tv["fc.weight"].shape == (1000, 2048)
    assert sum(v.numel() for k, v in tv.items()
               if "running" not in k and "num_batches" not in k) == 25_557_032


def _resnet(num_classes, **kw):
    return create_model("resnet18", num_classes=num_classes, input_shape=(3, 32, 32), **kw)


def test_torchvision_state_dict_loads_and_head_is_replaced(tmp_path):
    torch.manual_seed(0)
    src = _resnet(10, stem="imagenet")
    _scramble_buffers(src)
    path = tmp_path / "resnet18_tv.pth"
    torch.save(to_torchvision_resnet(src.state_dict()), path)

    cfg = build_config({"model": "resnet18", "model.stem": "imagenet", "init_from": str(path)})
    torch.manual_seed(1)
    dst = _resnet(5, stem="imagenet")
    fresh_head = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith("head.")}
    info = initialize(dst, cfg, (3, 32, 32))
    assert info == {"loaded": 120, "head": "reset", "renamed": True}
    got, want = dst.state_dict(), src.state_dict()
    assert got["head.weight"].shape == (5, 512)
    for k, v in got.items():
        if k.startswith("head."):
            assert torch.equal(v, fresh_head[k]), k  # reset: the new model's own head
        else:
            assert torch.equal(v, want[k]), k

    # Same number of classes: auto keeps the head; a timm-style wrapper is read too.
    torch.save({"state_dict": to_torchvision_resnet(src.state_dict()), "epoch": 90}, path)
    cfg = build_config({"model": "resnet18", "model.stem": "imagenet", "init_from": str(path)})
    same = _resnet(10, stem="imagenet")
    assert initialize(same, cfg, (3, 32, 32))["head"] == "kept"
    for k, v in same.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_torchvision_stem_into_cifar_stem_is_a_one_line_error(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(to_torchvision_resnet(_resnet(10, stem="imagenet").state_dict()), path)
    cfg = build_config({"model": "resnet18", "init_from": str(path)})
    with pytest.raises(ConfigError, match=r"'stem.0.weight' \('conv1.weight' in the file\) has "
                                          r"shape \(64, 3, 7, 7\).*model.stem=imagenet") as e:
        initialize(_resnet(10), cfg, (3, 32, 32))
    assert "\n" not in str(e.value)


def test_head_keep_with_a_shape_mismatch_is_a_one_line_error(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(to_torchvision_resnet(_resnet(10, stem="imagenet").state_dict()), path)
    cfg = build_config({"model": "resnet18", "model.stem": "imagenet", "init_from": str(path),
                        "init_head": "keep"})
    with pytest.raises(ConfigError, match=r"init_head=keep: the head's 'head.weight' \('fc."
                                          r"weight' in the file\) has shape \(10, 512\) in the "
                                          r"file, the model's is \(5, 512\)") as e:
        initialize(_resnet(5, stem="imagenet"), cfg, (3, 32, 32))
    assert "\n" not in str(e.value)


def test_missing_and_unexpected_tensors_and_init_strict(tmp_path):
    src = create_model("mlp", num_classes=10, input_shape=(64,), widths=[16])
    state = src.state_dict()
    path = tmp_path / "w.pt"
    torch.save({"net.1.weight": state["net.1.weight"], "extra.weight": torch.ones(3)}, path)
    base = {**MLP, "dataset": "digits", "init_from": str(path)}
    with pytest.raises(ConfigError, match="the model's 'net.1.bias' is not in the file"):
        initialize(create_model("mlp", 10, (64,), widths=[16]), build_config(base), (64,))
    torch.save({k: v for k, v in state.items()} | {"extra.weight": torch.ones(3)}, path)
    with pytest.raises(ConfigError, match="the file's 'extra.weight' is not in the model"):
        initialize(create_model("mlp", 10, (64,), widths=[16]), build_config(base), (64,))
    torch.save({"net.1.weight": state["net.1.weight"], "extra.weight": torch.ones(3)}, path)
    dst = create_model("mlp", 10, (64,), widths=[16])
    bias = dst.state_dict()["net.1.bias"].clone()
    info = initialize(dst, build_config({**base, "init_strict": False}), (64,))
    assert info["loaded"] == 1 and info["head"] == "reset"  # no head in the file
    assert torch.equal(dst.state_dict()["net.1.weight"], state["net.1.weight"])
    assert torch.equal(dst.state_dict()["net.1.bias"], bias)
    # DDP's "module." prefix is removed
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    assert list(read_state_dict(path)) == list(state)


# ----------------------------------------------------------------------------- through training

@pytest.fixture
def five_classes(tmp_path):
    """An npz data set of 64-feature vectors with 5 classes (the digits' input shape)."""
    g = np.random.default_rng(0)
    y_tr, y_te = g.integers(0, 5, 160), g.integers(0, 5, 40)
    x_tr = (g.normal(size=(160, 64)) + y_tr[:, None]).astype(np.float32)
    x_te = (g.normal(size=(40, 64)) + y_te[:, None]).astype(np.float32)
    path = tmp_path / "five.npz"
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return path


@pytest.fixture
def pretrained(tmp_path):
    """A finished 1-epoch digits run (10 classes): its folder."""
    out = tmp_path / "pre"
    train(build_config({**MLP, "dataset": "digits", "out": str(out)}))
    return out


def test_flatminima_checkpoint_as_init_from_with_a_new_head(tmp_path, pretrained, five_classes):
    pre = ckpt.load(pretrained / "last.pt")["model"]
    # body_lr=0 freezes the body: after training it still equals the pretrained weights.
    for source in (pretrained, pretrained / "last.pt"):
        out = tmp_path / f"ft_{source.name}"
        m = train(build_config({**MLP, "dataset": "npz", "data_root": str(five_classes),
                                "init_from": str(source), "body_lr": 0.0, "out": str(out)}))
        got = ckpt.load(out / "last.pt")["model"]
        assert got["net.3.weight"].shape == (5, 16)
        assert torch.equal(got["net.1.weight"], pre["net.1.weight"])
        assert torch.equal(got["net.1.bias"], pre["net.1.bias"])
        assert m["history"][-1]["lr_body"] == 0.0
        saved = ckpt.load(out / "last.pt")["config"]
        assert saved["init_from"] == str(source) and len(saved["init_sha256"]) == 64


def test_init_head_keep_mismatch_through_the_cli(tmp_path, pretrained, five_classes, capsys):
    rc = main(["train", "dataset=npz", f"data_root={five_classes}", "model=mlp",
               "model.widths=[16]", "epochs=1", "tensorboard=false", f"init_from={pretrained}",
               "init_head=keep", f"out={tmp_path / 'k'}", "-q"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "init_head=keep: the head's 'net.3.weight' has shape (10, 16)" in err


def test_body_lr_scales_the_body_at_every_step_and_resumes_bitwise(tmp_path, monkeypatch):
    seen: list[tuple[float, ...]] = []
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        seen.append(tuple(g["lr"] for g in self.param_groups))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    base = {**MLP, "dataset": "digits", "epochs": 2, "warmup_epochs": 0.5, "body_lr": 0.1}
    cfg = build_config({**base, "out": str(tmp_path / "ref")})
    m = train(cfg)
    steps = len(seen) // 2
    assert steps > 1 and len(seen) == 2 * steps
    for i, (body, head) in enumerate(seen):
        assert head == lr_at(cfg, i, steps)
        assert body == head * 0.1
    assert [r["lr_body"] for r in m["history"]] == [r["lr"] * 0.1 for r in m["history"]]
    monkeypatch.setattr(torch.optim.SGD, "step", real_step)

    # Interrupted after epoch 1 (the second checkpoint never written), then resumed.
    cut = build_config({**base, "out": str(tmp_path / "cut")})
    train_interrupted(cut, monkeypatch, at_save=2)
    assert ckpt.load(tmp_path / "cut" / "last.pt")["epoch"] == 1
    train(cut)
    a, b = ckpt.load(tmp_path / "ref" / "last.pt"), ckpt.load(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [g["lr_scale"] for g in b["optimizer"]["param_groups"]] == [0.1, 1.0]


def test_init_file_is_part_of_the_identity(tmp_path, pretrained):
    path = tmp_path / "w.pt"
    torch.save(ckpt.load(pretrained / "last.pt")["model"], path)
    base = {**MLP, "dataset": "digits", "init_from": str(path), "out": str(tmp_path / "r")}
    first = build_config(base)
    assert first.fingerprint() != build_config({**MLP, "dataset": "digits"}).fingerprint()
    assert first.replace(init_from=str(pretrained)).init_sha256 != first.init_sha256
    assert build_config({**base, "init_head": "reset"}).fingerprint() != first.fingerprint()
    assert build_config({**base, "body_lr": 0.5}).fingerprint() != first.fingerprint()
    # The file changes after the config was made: training refuses to load it.
    state = ckpt.load(pretrained / "last.pt")["model"]
    torch.save({k: v + 1 for k, v in state.items()}, path)
    with pytest.raises(ConfigError, match="has changed since this run's config was made"):
        train(first)
    # A run made with the new content is not resumed once the content changes again.
    train(build_config(base))
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"different config \(init_sha256\)"):
        train(build_config({**base, "epochs": 1}))


BAD = [
    (["init_from=nope.pt"], "init_from='nope.pt': not found"),
    (["init_from={tmp}/garbage.pt"], "corrupted or not a weights file"),
    (["init_from={tmp}/plain.pt"], "the model's 'net.1.weight' is not in the file"),
    (["init_from={tmp}/list.pt"], "no state_dict in it"),
    (["init_from={tmp}/plain.pt", "init_head=maybe"], "init_head='maybe': unknown"),
    (["body_lr=-0.1"], "body_lr=-0.1: must be >= 0"),
    (["init_sha256=abc"], "init_sha256='abc': given without init_from"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_init_inputs_exit_2_with_one_line(extra, needle, tmp_path, capsys, monkeypatch):
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.ones(1)}, tmp_path / "plain.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["train", "dataset=digits", "model=mlp", "model.widths=[16]", "epochs=1",
            "tensorboard=false", *[a.replace("{tmp}", str(tmp_path)) for a in extra], "-q"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert needle in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_train_from_a_torchvision_resnet_file_through_the_cli(tmp_path, capsys):
    """End to end: `flatminima train model=resnet18 model.stem=imagenet init_from=tv.pth` on a
    5-class image set; with body_lr=0 every body parameter stays the file's."""
    g = np.random.default_rng(0)
    np.savez(tmp_path / "img.npz", x_train=g.integers(0, 256, (16, 3, 16, 16), dtype=np.uint8),
             y_train=np.arange(16) % 5, x_test=g.integers(0, 256, (5, 3, 16, 16), dtype=np.uint8),
             y_test=np.arange(5))
    src = _resnet(1000, stem="imagenet")
    tv = to_torchvision_resnet(src.state_dict())
    torch.save(tv, tmp_path / "tv.pth")
    out = tmp_path / "ft"
    rc = main(["train", "dataset=npz", f"data_root={tmp_path / 'img.npz'}", "model=resnet18",
               "model.stem=imagenet", f"init_from={tmp_path / 'tv.pth'}", "body_lr=0",
               "epochs=1", "batch_size=8", "eval_batch_size=16", "tensorboard=false",
               "threads=1", f"out={out}", "-q"])
    assert rc == 0, capsys.readouterr().err
    got = ckpt.load(out / "last.pt")["model"]
    assert got["head.weight"].shape == (5, 512)
    params = {n for n, _ in src.named_parameters()}
    for k, v in from_torchvision_resnet(tv).items():
        if k in params and not k.startswith("head."):
            assert torch.equal(got[k], v), k
