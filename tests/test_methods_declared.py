"""Methods declared once: the signature, checks, hparams, repr, state and CLI keys all come from
one declaration per argument; and the defects the declaration and the selection fixed."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from flatminima.experiment.config import ConfigError, load_config, method_signature
from tests._method_refs import TEST_HPARAMS, tiny_batch, tiny_mlp

ALL = fm.list_methods()


@pytest.mark.parametrize("name", ALL)
def test_everything_derives_from_the_declaration(name):
    cls = fm.methods.method_class(name)
    declared = cls.declared
    assert list(inspect.signature(cls).parameters) == list(declared)
    method = cls()
    hp = method.hparams()
    assert list(hp) == [n for n, d in declared.items() if d.kind == "hparam"]
    assert hp == {n: d.default for n, d in declared.items() if d.kind == "hparam"}
    assert repr(method) == f"{cls.__name__}(" + ", ".join(f"{k}={v!r}" for k, v in hp.items()) + ")"
    assert eval(repr(method), {cls.__name__: cls}).hparams() == hp
    assert set(method_signature(name)) == {n for n, d in declared.items() if d.kind != "argument"}
    assert method.name == name and fm.methods.METHODS[name] is cls
    # Every declared check runs on every call: a scheduled bad value is caught by backward.
    for key, value in TEST_HPARAMS[name].items():
        setattr(method, key, value)
    numeric = [k for k, v in hp.items() if isinstance(v, float)]
    if numeric:
        setattr(method, numeric[0], -1.0)
        with pytest.raises(ValueError, match=numeric[0]):
            method.backward(tiny_mlp(), *tiny_batch())


def test_unknown_arguments_are_type_errors_naming_the_class():
    with pytest.raises(TypeError, match="NRS"):
        fm.NRS(rho=0.1, beta=2)
    with pytest.raises(ValueError, match="bad argument for method 'nrs'"):
        fm.create_method("nrs", beta=2)
    with pytest.raises(TypeError):
        fm.SAM(0.1, 0.2)  # SAM has one positional hyperparameter


@pytest.mark.parametrize("cls", [fm.RPR, fm.NRS, fm.NSO, fm.RWP, fm.SmoothOut, fm.AdaSmoothOut])
def test_noise_must_be_callable_for_every_random_method(cls):
    with pytest.raises(ValueError, match="noise must be callable"):
        cls(noise=3)


def test_registering_two_classes_under_one_name_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        fm.methods.register_method("nrs")(type("Other", (fm.Method,), {}))


# ----------------------------------------------------------------------------- selection


def test_a_one_shot_params_iterator_selects_on_every_call():
    model = tiny_mlp()
    x, y = tiny_batch()
    method = fm.NRS(rho=0.2, params=(n for n, p in model.named_parameters() if p.dim() > 1))
    for _ in range(3):
        result = method.backward(model, x, y, generator=torch.Generator().manual_seed(0))
        assert float(result.divergence) > 0  # the weights are perturbed on every call
    sam = fm.SAM(params=iter(["2.weight"]))
    for _ in range(2):
        sam.backward(model, x, y)
    assert sam.params == ("2.weight",)


def test_an_empty_selection_is_a_value_error_naming_it():
    model = tiny_mlp()
    x, y = tiny_batch()
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        fm.RPR(params=lambda n: n.startswith("nope")).backward(model, x, y)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        fm.SAM(params=[]).backward(model, x, y)


def test_methods_take_the_measurements_selection_vocabulary():
    model = tiny_mlp()
    x, y = tiny_batch()
    u_seen = {}

    def noise(params, generator):
        u_seen.update(params)
        return {n: torch.zeros_like(p) for n, p in params.items()}

    fm.RPR(params="last_layer", noise=noise).backward(model, x, y)
    assert set(u_seen) == {"2.weight", "2.bias"}
    u_seen.clear()
    fm.RPR(params=lambda name: name.endswith("bias"), noise=noise).backward(model, x, y)
    assert set(u_seen) == {"0.bias", "2.bias"}


@pytest.mark.skipif(not hasattr(nn, "RMSNorm"), reason="torch without nn.RMSNorm")
def test_no_norm_excludes_rmsnorm():
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3))
    assert set(fm.noise.named_trainable_params(model, "no_norm")) == {
        "0.weight", "0.bias", "2.weight", "2.bias"}


# ----------------------------------------------------------------------------- defects


def test_rwp_gamma_on_the_command_line_is_rwps_and_the_schedule_has_its_own_name():
    cfg = load_config(None, ["method=rwp", "gamma=0.05"])
    assert cfg.hparams == {"gamma": 0.05} and cfg.lr_gamma == 0.1
    cfg = load_config(None, ["schedule=step", "lr_gamma=0.2"])
    assert cfg.lr_gamma == 0.2
    with pytest.raises(ConfigError, match="it is now 'lr_gamma'"):
        load_config(None, ["schedule=step", "gamma=0.2"])


def test_a_saved_config_with_the_old_schedule_name_still_loads():
    from flatminima.experiment.config import config_from_dict

    saved = load_config(None, ["method=rwp", "gamma=0.05", "lr_gamma=0.3"]).to_dict()
    saved["gamma"] = saved.pop("lr_gamma")
    cfg = config_from_dict(saved)
    assert cfg.lr_gamma == 0.3 and cfg.hparams == {"gamma": 0.05}


def test_nrs_refuses_a_single_output():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for low_memory in (False, True):
        with pytest.raises(ValueError, match="logits over at least 2 classes"):
            fm.NRS(low_memory=low_memory).backward(model, x, y, F.mse_loss)


def test_rwp_noise_on_a_vector_uses_the_whole_tensors_norm():
    # Official nblt/RWP: std gamma * ||w_filter|| for matrices, gamma * ||b|| for vectors.
    gamma = 0.1
    w = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    b = torch.tensor([1.0, 2.0, 2.0])  # ||b|| = 3; per-entry rule would give 0.1, 0.2, 0.2
    noise = fm.RWP(gamma=gamma).default_noise()
    g = torch.Generator().manual_seed(0)
    draws = [noise({"w": w, "b": b}, g) for _ in range(4000)]
    std_b = torch.stack([d["b"] for d in draws]).std(dim=0)
    std_w = torch.stack([d["w"] for d in draws]).std(dim=0)
    torch.testing.assert_close(std_b, torch.full((3,), gamma * 3.0), rtol=0.05, atol=0)
    torch.testing.assert_close(std_w, torch.tensor([[0.5, 0.5], [0.1, 0.1]]), rtol=0.05, atol=0)


def test_smoothout_draws_per_micro_batch_and_the_others_share_one_draw():
    model = tiny_mlp()
    x, y = tiny_batch(n=8)
    for name in ALL:
        drawn = []

        def noise(params, generator, drawn=drawn):
            u = {n: 0.01 * torch.randn_like(p) for n, p in params.items()}
            drawn.append(u)
            return u

        method = fm.create_method(name)
        if not isinstance(method, fm.methods.RandomPerturbation):
            continue
        method.noise = noise
        method.backward(model, [x[:4], x[4:]], [y[:4], y[4:]])
        per_call = getattr(method, "num_samples", 1)
        want = 2 * per_call if name in ("smoothout", "adasmoothout") else per_call
        assert len(drawn) == want, name


def test_method_docstrings_list_their_arguments():
    for name in ALL:
        doc = fm.methods.method_class(name).__doc__
        assert "Args:" in doc, name
