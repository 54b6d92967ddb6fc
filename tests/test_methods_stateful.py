"""MSAM, VaSSO, ESAM and Fisher SAM beyond the registry-wide tests: several steps against a
float64 reference (MSAM reads a real optimizer's momentum, VaSSO keeps a moving average), the
state's round trip, ESAM's generator-seeded mask, and the errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from tests._method_refs import (
    esam_ref,
    fisher_sam_ref,
    msam_ref,
    params_of,
    tiny_batch,
    tiny_mlp,
    vasso_ref_sequence,
)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads(got, want, **tol):
    tol = tol or {"rtol": 1e-10, "atol": 1e-12}
    for n in want:
        torch.testing.assert_close(got[n], want[n], msg=n, **tol)


# ----------------------------------------------------------------------------- MSAM


@pytest.mark.parametrize("make_opt, key", [
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2), "momentum_buffer"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.8, nesterov=True), "momentum_buffer"),
    (lambda p: torch.optim.AdamW(p, lr=1e-2), "exp_avg"),
])
def test_msam_follows_the_optimizers_momentum_over_several_steps(make_opt, key):
    model = tiny_mlp()
    opt = make_opt(model.parameters())
    method = fm.MSAM(rho=0.4, optimizer=opt)
    hp = {"rho": 0.4}
    for step in range(4):
        x, y = tiny_batch(seed=20 + step)
        momentum = {n: (opt.state[p][key].clone() if key in opt.state[p] else None)
                    for n, p in model.named_parameters()}
        before = {n: v.clone() for n, v in momentum.items() if v is not None}
        method.backward(model, x, y)
        # step 0: no buffer yet, the plain gradient; then grad L(w - rho v/||v||)
        assert_grads(grads_of(model), msam_ref(hp, model, x, y, momentum))
        for n, p in model.named_parameters():  # read, never written
            if n in before:
                assert torch.equal(opt.state[p][key], before[n])
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(key in opt.state[p] for p in model.parameters())


def test_msam_optimizer_given_after_construction_and_errors_name_the_problem():
    model = tiny_mlp()
    x, y = tiny_batch()
    method = fm.MSAM()
    with pytest.raises(ValueError, match="optimizer"):
        method.backward(model, x, y)
    method.optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # momentum=0: no buffer
    with pytest.raises(ValueError, match=r"keeps no momentum for parameter '0.weight'"):
        method.backward(model, x, y)
    method.optimizer = torch.optim.SGD(list(model.parameters())[:2], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"'2.weight' is not in the optimizer"):
        method.backward(model, x, y)
    with pytest.raises(ValueError, match="torch.optim.Optimizer"):
        fm.MSAM(optimizer=3)


def test_msam_single_pass_mode_updates_statistics_at_w_plus_e():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = tiny_batch(n=12)
    fm.Baseline().backward(model, x, y)
    opt.step()
    opt.zero_grad()
    before = copy.deepcopy(model.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    twin_opt.load_state_dict(opt.state_dict())
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    result = fm.MSAM(rho=0.3, clean_pass=False, optimizer=opt).backward(model, x, y)
    assert len(calls) == 1  # the paper's single pass
    fm.MSAM(rho=0.3, optimizer=twin_opt).backward(twin, x, y)  # the same gradient
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)
    # Its statistics and loss are those of a training-mode forward at w + e.
    v = {n: opt.state[p]["momentum_buffer"] for n, p in model.named_parameters()}
    norm = torch.sqrt(sum((t**2).sum() for t in v.values()))
    reference = copy.deepcopy(twin)
    reference.load_state_dict(before)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            p.sub_(0.3 * v[n] / norm)
        out = reference(x)
    for (n, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(b, r, rtol=1e-12, atol=1e-12, msg=n)
    torch.testing.assert_close(result.loss, F.cross_entropy(out, y))
    for n, t in model.state_dict().items():  # the weights themselves never moved
        if "running" not in n and "num_batches" not in n:
            assert torch.equal(t, before[n]), n


# ----------------------------------------------------------------------------- VaSSO


def test_vasso_moving_average_over_several_steps_and_its_state_round_trip():
    model = tiny_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    hp = {"rho": 0.3, "theta": 0.4}
    method = fm.VaSSO(**hp)
    d = None
    for step in range(4):
        x, y = tiny_batch(seed=30 + step)
        (want,), d = vasso_ref_sequence(hp, model, [(x, y)], d)
        method.backward(model, x, y)
        assert_grads(grads_of(model), want)
        if step == 1:  # a resumed method continues the same average
            buf = io.BytesIO()
            torch.save(method.state_dict(), buf)
            buf.seek(0)
            resumed = fm.VaSSO()
            resumed.load_state_dict(torch.load(buf, weights_only=True))
            assert resumed.hparams() == method.hparams()
            method = resumed
        opt.step()
        opt.zero_grad(set_to_none=True)
    state = method.state_dict()
    assert set(state["ema"]) == {n for n, _ in model.named_parameters()}
    for n in d:
        torch.testing.assert_close(state["ema"][n], d[n], rtol=1e-10, atol=1e-12)
    assert fm.VaSSO().state_dict()["ema"] == {}  # a fresh method starts a new average


def test_vasso_theta_one_is_sam():
    model = tiny_mlp()
    method = fm.VaSSO(rho=0.3, theta=1.0)
    for step in range(2):
        x, y = tiny_batch(seed=step)
        model.zero_grad()
        method.backward(model, x, y)
        got = grads_of(model)
        model.zero_grad()
        fm.SAM(rho=0.3).backward(model, x, y)
        assert_grads(got, grads_of(model))


# ----------------------------------------------------------------------------- ESAM


def esam_mask(model, beta, seed):
    draw = torch.rand(len(list(model.parameters())), generator=torch.Generator().manual_seed(seed))
    return [n for (n, _), r in zip(model.named_parameters(), draw.tolist(), strict=True)
            if r < beta]


def test_esam_perturbs_the_generator_drawn_subset_scaled_by_one_over_beta():
    model = tiny_mlp()
    x, y = tiny_batch()
    hp = {"rho": 0.3, "beta": 0.5, "gamma": 0.6}
    seed = next(s for s in range(100) if 0 < len(esam_mask(model, 0.5, s)) < 4)
    kept = esam_mask(model, 0.5, seed)
    fm.ESAM(**hp).backward(model, x, y, generator=torch.Generator().manual_seed(seed))
    assert_grads(grads_of(model), esam_ref(hp, model, x, y, kept))
    grads = []
    for s in (seed, seed, seed + 1):
        model.zero_grad()
        fm.ESAM(**hp).backward(model, x, y, generator=torch.Generator().manual_seed(s))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
    assert esam_mask(model, 0.5, seed) != esam_mask(model, 0.5, seed + 1)
    assert not torch.equal(grads[0], grads[2])


def test_esam_selects_exactly_the_top_gamma_examples():
    model = tiny_mlp()
    x, y = tiny_batch(n=20)
    result = fm.ESAM(rho=0.5, beta=1.0, gamma=0.3).backward(model, x, y)
    w = params_of(model)
    g = torch.func.grad(lambda p: F.cross_entropy(torch.func.functional_call(model, p, (x,)),
                                                  y))(w)
    norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
    pe = {n: w[n] + 0.5 * g[n] / norm for n in w}
    with torch.no_grad():
        after = F.cross_entropy(torch.func.functional_call(model, pe, (x,)), y, reduction="none")
        before = F.cross_entropy(model(x), y, reduction="none")
    top = torch.topk(after - before, 6).indices  # floor(0.3 * 20)
    torch.testing.assert_close(result.perturbed_loss, after[top].mean())


def test_esam_with_beta_and_gamma_one_is_sam_and_micro_batches_with_batchnorm_run():
    model = tiny_mlp()
    x, y = tiny_batch()
    fm.ESAM(rho=0.3, beta=1.0, gamma=1.0).backward(model, x, y)
    got = grads_of(model)
    model.zero_grad()
    fm.SAM(rho=0.3).backward(model, x, y)
    assert_grads(got, grads_of(model))
    torch.manual_seed(0)
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    xs, ys = tiny_batch(dtype=torch.float32, n=12)
    # micro-batches of 2: the 6 selected examples run as chunks of 2, never a lone example
    fm.ESAM(gamma=0.5).backward(bn, list(xs.chunk(6)), list(ys.chunk(6)),
                                generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(p.grad).all() for p in bn.parameters())


def test_esam_rejects_zero_fractions():
    for key in ("beta", "gamma"):
        with pytest.raises(ValueError, match=key):
            fm.ESAM(**{key: 0.0})


# ----------------------------------------------------------------------------- Fisher SAM


def test_fisher_sam_with_eta_zero_is_sam_and_large_gradients_move_less():
    model = tiny_mlp()
    x, y = tiny_batch()
    fm.FisherSAM(rho=0.3, eta=0.0).backward(model, x, y)
    got = grads_of(model)
    model.zero_grad()
    fm.SAM(rho=0.3).backward(model, x, y)
    assert_grads(got, grads_of(model))
    model.zero_grad()
    fm.FisherSAM(rho=0.3, eta=50.0).backward(model, x, y)
    assert_grads(grads_of(model), fisher_sam_ref({"rho": 0.3, "eta": 50.0}, model, x, y))
