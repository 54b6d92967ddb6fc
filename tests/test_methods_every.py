"""Paying less: ``fm.Every`` (every k steps, LookSAM's reuse, a window of training) against the
wrapped method and Baseline bitwise, and against a float64 LookSAM reference over several steps;
its state across a resume; and ``train``'s ``method_*`` keys, with a crash-and-resume run for
each stateful method."""

from __future__ import annotations

import copy
import importlib
import io

import pytest
import torch
from torch import nn

import flatminima as fm
from flatminima.experiment import checkpoint as ckpt
from flatminima.experiment.config import REUSES, ConfigError, build_config
from flatminima.experiment.train import train
from tests._method_refs import (
    ReplayNoise,
    fixed_noise,
    loss_at,
    params_of,
    ref_grad,
    tiny_batch,
    tiny_mlp,
)

# The module (``flatminima.experiment.train`` the attribute is the function).
train_module = importlib.import_module("flatminima.experiment.train")


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def norm(d):
    return torch.sqrt(sum((t**2).sum() for t in d.values()))


def dot(a, b):
    return sum((a[n] * b[n]).sum() for n in a)


def test_off_steps_are_baseline_and_on_steps_the_method_bitwise():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    method = fm.Every(fm.SAM(rho=0.3), every=3)
    for t in range(7):
        x, y = tiny_batch(seed=t)
        twin = copy.deepcopy(model)
        (fm.SAM(rho=0.3) if t % 3 == 0 else fm.Baseline()).backward(twin, x, y)
        method.backward(model, x, y)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), t
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert method.count == 7


def test_a_window_applies_the_method_only_between_start_and_stop():
    method = fm.Every(fm.SAM(rho=0.3), 1, start=2, stop=4)
    assert [method.phase(t) for t in range(6)] == ["outside", "outside", "on", "on", "outside",
                                                     "outside"]
    model = tiny_mlp()
    x, y = tiny_batch()
    for t in range(6):
        model.zero_grad(set_to_none=True)
        method.backward(model, x, y)
        got = grads_of(model)
        model.zero_grad(set_to_none=True)
        (fm.SAM(rho=0.3) if t in (2, 3) else fm.Baseline()).backward(model, x, y)
        for n, g in grads_of(model).items():
            assert torch.equal(got[n], g), (t, n)


def looksam_reference(name, hp, every, alpha, steps, reuse="looksam"):
    """LookSAM (Liu et al. 2022, Algorithm 1) in float64 on a pure function of the weights:
    on-steps the method's reference G and g_v = G - (<G, g>/||g||^2) g; off-steps
    g + alpha ||g||/||g_v|| g_v ("difference": g + (G - g) of the last on-step)."""
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    draws = [fixed_noise(params_of(model), seed=40 + i) for i in range(3)]
    out, kept, on = [], None, 0
    for t in range(steps):
        x, y = tiny_batch(seed=50 + t)
        g = torch.func.grad(loss_at(model, x, y))(params_of(model))
        if t % every == 0:
            G = ref_grad(name, hp, model, x, y, [draws[on % 3]])
            on += 1
            if reuse == "looksam":
                c = dot(G, g) / norm(g) ** 2
                kept = {n: G[n] - c * g[n] for n in G}
            else:
                kept = {n: G[n] - g[n] for n in G}
            want = G
        elif reuse == "looksam":
            want = {n: g[n] + alpha * norm(g) / norm(kept) * kept[n] for n in g}
        else:
            want = {n: g[n] + kept[n] for n in g}
        out.append(want)
        for n, p in model.named_parameters():  # step the reference's weights with it
            p.grad = want[n].clone()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out, draws


@pytest.mark.parametrize("name, hp, reuse", [
    ("sam", {"rho": 0.3}, "looksam"),
    ("nrs", {"rho": 0.1, "alpha": 0.7}, "looksam"),  # its clean gradient by one more pass
    ("nrs", {"rho": 0.1, "alpha": 0.7}, "difference"),
    ("vasso", {"rho": 0.3, "theta": 1.0}, "looksam"),
])
def test_reuse_matches_a_float64_reference_over_several_steps(name, hp, reuse):
    every, alpha, steps = 3, 0.6, 8
    want, draws = looksam_reference(name, hp, every, alpha, steps, reuse)
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    extra = {"noise": ReplayNoise(draws)} if name == "nrs" else {}
    method = fm.Every(fm.create_method(name, **hp, **extra), every, reuse=reuse, alpha=alpha)
    for t in range(steps):
        x, y = tiny_batch(seed=50 + t)
        method.backward(model, x, y)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[t][n], rtol=1e-9, atol=1e-11, msg=(t, n))
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_reuse_accumulates_onto_existing_gradients():
    x, y = tiny_batch()
    for t in range(2):  # an on-step, then an off-step
        model, twin = tiny_mlp(), tiny_mlp()
        a = fm.Every(fm.SAM(rho=0.3), 2, reuse="looksam")
        b = fm.Every(fm.SAM(rho=0.3), 2, reuse="looksam")
        for _ in range(t):
            a.backward(model, x, y)
            b.backward(twin, x, y)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        twin.zero_grad(set_to_none=True)
        a.backward(model, x, y)
        b.backward(twin, x, y)
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad + 1, rtol=1e-12, atol=1e-12)


def count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    return calls


def test_sams_own_clean_gradient_is_reused_and_others_cost_one_pass_more():
    x, y = tiny_batch()
    model = tiny_mlp()
    calls = count_forwards(model)
    fm.Every(fm.SAM(rho=0.3), 2, reuse="looksam").backward(model, x, y)
    assert len(calls) == 2  # SAM's two passes, nothing more
    model = tiny_mlp()
    calls = count_forwards(model)
    fm.Every(fm.SAM(rho=0.3, params="weights"), 2, reuse="looksam").backward(model, x, y)
    assert len(calls) == 3  # the biases' clean gradient is not SAM's: one pass more
    model = tiny_mlp()
    calls = count_forwards(model)
    method = fm.Every(fm.NRS(rho=0.1), 2, reuse="looksam")
    method.backward(model, x, y)
    assert len(calls) == 3
    method.backward(model, x, y)
    assert len(calls) == 4  # an off-step is one pass


def test_reuse_with_a_scaler_equals_without():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    a = fm.Every(fm.SAM(rho=0.3), 2, reuse="looksam")
    b = fm.Every(fm.SAM(rho=0.3), 2, reuse="looksam")
    for t in range(3):
        x, y = tiny_batch(dtype=torch.float32, seed=t, n=16)
        model.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        a.backward(model, x, y)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        b.backward(twin, x, y, scaler=scaler)
        scaler.unscale_(torch.optim.SGD(twin.parameters(), lr=0.1))
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_state_round_trip_continues_the_same_sequence():
    def run(method, model, opt, seeds):
        for s in seeds:
            x, y = tiny_batch(seed=s)
            method.backward(model, x, y)
            opt.step()
            opt.zero_grad(set_to_none=True)

    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    method = fm.Every(fm.VaSSO(rho=0.3, theta=0.4), 3, reuse="difference", start=1)
    run(method, model, opt, range(5))
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    resumed = fm.Every(fm.VaSSO(), 3, reuse="difference", start=1)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.count == 5 and resumed.hparams() == method.hparams()
    assert resumed.method.hparams() == method.method.hparams()
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.9)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load shares the tensors
    run(method, model, opt, range(5, 9))
    run(resumed, twin, twin_opt, range(5, 9))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("factory, match", [
    (lambda: fm.Every(fm.SAM(), 0), "every"),
    (lambda: fm.Every(fm.SAM(), 2, reuse="all"), "reuse"),
    (lambda: fm.Every(fm.SAM(), 2, start=5, stop=5), "stop"),
    (lambda: fm.Every("sam", 2), "method"),
    (lambda: fm.Every(fm.Every(fm.SAM(), 2), 2), "already"),
    (lambda: fm.Every(fm.SAM(), 2, params="weights"), "params"),
    (lambda: fm.Every(fm.SAM(rho=-1.0), 2), "rho"),
])
def test_bad_arguments_are_value_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# ----------------------------------------------------------------------------- train

TINY = {"dataset": "digits", "model": "mlp", "model.widths": [16], "epochs": 3,
        "batch_size": 64, "quiet": True, "tensorboard": False, "threads": 1}


def test_config_keys_validate_and_leave_old_fingerprints_alone(tmp_path):
    base = build_config(TINY)
    assert not any(k.startswith("method_") for k in base.identity())
    assert build_config({**TINY, "method_every": 2}).fingerprint() != base.fingerprint()
    assert REUSES == fm.methods.every.REUSES
    for bad, match in [({"method_every": 0}, "method_every"),
                       ({"method_reuse": "looksam"}, "method_every > 1"),
                       ({"method_every": 2, "method_reuse": "x"}, "method_reuse"),
                       ({"method_start": 0.5, "method_stop": 0.5}, "method_stop")]:
        with pytest.raises(ConfigError, match=match):
            build_config({**TINY, **bad})
    cfg = build_config({**TINY, "method": "sam", "method_every": 2, "method_start": 0.5})
    method = train_module.scheduled(fm.SAM(), cfg, 100)
    assert isinstance(method, fm.Every) and (method.every, method.start, method.stop) == (2, 50,
                                                                                         None)
    assert train_module.scheduled(fm.SAM(), base, 100).__class__ is fm.SAM


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("keys", [
    {"method": "sam", "method_every": 3, "method_reuse": "looksam", "method_start": 0.2},
    {"method": "msam", "rho": 0.3},
    {"method": "vasso", "theta": 0.5},
    {"method": "esam", "beta": 0.5},
])
def test_a_run_killed_mid_epoch_resumes_bitwise(keys, tmp_path, monkeypatch):
    ref = train(build_config({**TINY, **keys, "out": str(tmp_path / "ref")}))
    real = train_module.scheduled

    def dies_in_epoch_two(*a, **k):
        method = real(*a, **k)
        backward, calls = method.backward, {"n": 0}

        def counted(*a, **k):
            calls["n"] += 1
            if calls["n"] == 30:  # in the second epoch (asserted below)
                raise Killed
            return backward(*a, **k)

        method.backward = counted
        return method

    cfg = build_config({**TINY, **keys, "out": str(tmp_path / "cut")})
    monkeypatch.setattr(train_module, "scheduled", dies_in_epoch_two)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    assert ckpt.load(tmp_path / "cut" / "last.pt")["epoch"] == 1
    got = train(cfg)
    a, b = ckpt.load(tmp_path / "ref" / "last.pt"), ckpt.load(tmp_path / "cut" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert_same(a["method"], b["method"])
    assert [r["train_loss_running"] for r in ref["history"]] == [
        r["train_loss_running"] for r in got["history"]]


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# ----------------------------------------------------------------------------- DDP (last: the
# group lives until the module ends)

@pytest.mark.parametrize("inner", ["sam", "nrs"])
def test_under_ddp_reuse_synchronizes_once_and_equals_the_plain_model(inner, process_group):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    model = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    seen = []  # (graph, synchronized) of every forward
    model.module.register_forward_pre_hook(
        lambda _m, _i: seen.append((torch.is_grad_enabled(), model.require_backward_grad_sync)))
    draws = [fixed_noise(params_of(plain), seed=60 + i) for i in range(3)]

    def make():
        replay = ReplayNoise(draws)

        def positional(params, generator=None):  # DDP names its parameters "module...."
            return dict(zip(params, replay(params).values(), strict=True))

        extra = {"noise": positional} if inner == "nrs" else {}
        return fm.Every(fm.create_method(inner, rho=0.1, **extra), 2, reuse="looksam")

    a, b = make(), make()
    for t in range(3):
        x, y = tiny_batch(seed=t)
        seen.clear()
        model.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
        a.backward(model, [x[:4], x[4:]], [y[:4], y[4:]])
        b.backward(plain, x, y)
        assert sum(1 for graph, sync in seen if graph and sync) == 1, (t, seen)
        for p, q in zip(model.module.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert set(a.state_dict()["reused"]) == {n for n, _ in plain.named_parameters()}
