"""Config: YAML + key=value overrides, type coercion, range checks, identity hashing."""

from __future__ import annotations

import pytest

from flatminima.experiment.config import (
    Config,
    ConfigError,
    build_config,
    coerce,
    config_from_dict,
    load_config,
    split_overrides,
)


def test_overrides_parse_yaml_scalars():
    assert split_overrides(["lr=1e-3", "amp=true", "out=x", "grad_clip=none", "milestones=[3,6]"]) \
        == {"lr": 1e-3, "amp": True, "out": "x", "grad_clip": None, "milestones": [3, 6]}


def test_the_word_none_is_a_choice_where_a_field_cannot_be_empty():
    assert build_config(split_overrides(["augment=none", "grad_clip=none"])).augment == "none"
    with pytest.raises(ConfigError, match="dataset='none'"):
        build_config(split_overrides(["dataset=none"]))


def test_yaml_then_overrides_then_routing(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: nrs\nhparams: {rho: 0.1}\nlr: 0.2\nmodel_args: {widths: [8]}\n")
    cfg = load_config(f, ["alpha=0.5", "lr=0.05", "model.dropout=0.1"])
    assert cfg.method == "nrs" and cfg.lr == 0.05
    assert cfg.hparams == {"rho": 0.1, "alpha": 0.5}
    assert cfg.model_args == {"widths": [8], "dropout": 0.1}


def test_coercion_by_type_hint():
    assert coerce("epochs", "3", int) == 3 and coerce("epochs", 3.0, int) == 3
    assert coerce("lr", "0.5", float) == 0.5 and coerce("lr", 1, float) == 1.0
    assert coerce("amp", "off", bool) is False
    with pytest.raises(ConfigError, match="epochs=2.5: must be an integer"):
        coerce("epochs", 2.5, int)
    with pytest.raises(ConfigError, match="lr=True: must be a number"):
        coerce("lr", True, float)


def test_method_hparams_take_the_default_types():
    cfg = build_config({"method": "nrs", "rho": 1, "alpha": "2"})
    assert cfg.hparams == {"rho": 1.0, "alpha": 2.0}
    assert isinstance(cfg.hparams["rho"], float)


@pytest.mark.parametrize("values,needle", [
    ({"lr": 0}, "lr=0.0: must be > 0"),
    ({"momentum": 1.0}, "momentum=1.0: must be < 1"),
    ({"val_split": 1.0}, "val_split=1.0: must be < 1"),
    ({"warmup_epochs": 5, "epochs": 2}, "exceeds epochs=2"),
    ({"schedule": "linear"}, "schedule='linear': unknown"),
    ({"method": "sam", "alpha": 1.0}, "unknown key 'alpha'"),
    ({"grad_clip": -1}, "grad_clip=-1.0: must be > 0"),
])
def test_range_errors_name_the_key(values, needle):
    with pytest.raises(ConfigError) as e:
        build_config(values)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_identity_ignores_presentation_fields():
    a = Config(out="a", quiet=True, tensorboard=False)
    b = Config(out="b", quiet=False)
    assert a.fingerprint() == b.fingerprint()
    assert Config(lr=0.2).fingerprint() != b.fingerprint()


def test_round_trip_through_dict():
    cfg = build_config({"method": "nrs", "rho": 0.1, "model.widths": [4, 4], "seed": 3})
    assert config_from_dict(cfg.to_dict()) == cfg


def test_learning_rate_schedule_matches_closed_forms():
    import math

    from flatminima.experiment.train import lr_at

    cos = Config(lr=0.4, epochs=10, warmup_epochs=2, schedule="cosine")
    spe = 5  # steps per epoch: 10 warm-up steps, then 40 cosine steps
    assert [lr_at(cos, s, spe) for s in (0, 4, 9)] == pytest.approx([0.04, 0.2, 0.4])
    assert lr_at(cos, 10, spe) == pytest.approx(0.4)  # cosine starts at the peak
    assert lr_at(cos, 30, spe) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(cos, 49, spe) == pytest.approx(0.4 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    step = Config(lr=1.0, epochs=10, schedule="step", milestones=[0.5, 8], lr_gamma=0.1)
    assert [lr_at(step, e * 3, 3) for e in (0, 4, 5, 7, 8, 9)] \
        == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lr_at(Config(lr=0.3, schedule="constant"), 123, 7) == 0.3
