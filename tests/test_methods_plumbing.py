"""The shared guarantees of every method: restore, BatchNorm, micro-batches, AMP scaler, RNG."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from tests._method_refs import NOISY, TEST_HPARAMS, ReplayNoise, fixed_noise, params_of, tiny_batch

ALL = fm.list_methods()  # the registry: a method without a reference test fails here


def bn_net(momentum=0.1, sync=False, dropout=0.0) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.SyncBatchNorm(8, momentum=momentum) if sync else nn.BatchNorm1d(8, momentum=momentum)
    return nn.Sequential(nn.Linear(4, 8), norm, nn.ReLU(), nn.Dropout(dropout), nn.Linear(8, 3))


def make(name, **extra):
    return fm.create_method(name, **dict(TEST_HPARAMS[name], **extra))


@pytest.mark.parametrize("name", ALL)
def test_weights_restored_bitwise(name):
    model = bn_net(dropout=0.2)
    before = {n: t.clone() for n, t in model.state_dict().items() if "running" not in n
              and "num_batches" not in n}
    x, y = tiny_batch(dtype=torch.float32, n=16)
    make(name).backward(model, x, y, generator=torch.Generator().manual_seed(0))
    for n, t in before.items():
        assert torch.equal(model.state_dict()[n], t), n


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_batchnorm_stats_equal_one_clean_forward(name, momentum, sync):
    model = bn_net(momentum, sync)
    reference = copy.deepcopy(model)
    x, y = tiny_batch(dtype=torch.float32, n=16)
    make(name).backward(model, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference(x)
    for (n, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, r), n


@pytest.mark.parametrize("name", ALL)
def test_micro_batches_give_full_batch_gradient(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    twin = copy.deepcopy(model)
    x, y = tiny_batch(n=13)
    draws = [fixed_noise(params_of(model), seed=3 + i) for i in range(3)]
    extra = {"noise": ReplayNoise(draws)} if name in NOISY else {}
    full = make(name, **extra).backward(model, x, y)
    extra = {"noise": ReplayNoise(draws)} if name in NOISY else {}
    if name in ("smoothout", "adasmoothout"):
        # SmoothOut draws fresh noise per micro-batch (ghost batch): give each the same draw.
        extra = {"noise": ReplayNoise(draws[:1])}
    parts = make(name, **extra).backward(twin, [x[:5], x[5:9], x[9:]], [y[:5], y[5:9], y[9:]])
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(full.loss, parts.loss)
    torch.testing.assert_close(full.logits, parts.logits)


@pytest.mark.parametrize("name", ALL)
def test_scaler_on_equals_off(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    x, y = tiny_batch(dtype=torch.float32, n=16)
    make(name).backward(model, x, y, generator=torch.Generator().manual_seed(1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    make(name).backward(twin, x, y, generator=torch.Generator().manual_seed(1), scaler=scaler)
    opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    scaler.unscale_(opt)
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", ALL)
def test_overflow_makes_scaler_skip_the_step(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    x, y = tiny_batch(dtype=torch.float32, n=16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def big_loss(out, y):  # its scaled gradients overflow float32 in every pass
        return F.cross_entropy(out, y) * 1e6

    make(name).backward(model, x, y, big_loss, generator=torch.Generator().manual_seed(1),
                        scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**127
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("name", NOISY)
def test_overflow_in_the_perturbed_pass_alone_skips_the_step(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    before = copy.deepcopy(model.state_dict())
    x, y = tiny_batch(dtype=torch.float32, n=16)
    huge = ReplayNoise([{n: torch.full_like(p, 3e38) for n, p in model.named_parameters()}])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make(name, noise=huge).backward(model, x, y, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**8
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("name", NOISY)
def test_generator_makes_draws_reproducible(name):
    x, y = tiny_batch(dtype=torch.float32, n=16)
    grads = []
    for seed in (5, 5, 6):
        model = bn_net()
        make(name).backward(model, x, y, generator=torch.Generator().manual_seed(seed))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], grads[2])


def test_noise_with_wrong_shape_is_rejected():
    model = bn_net()
    x, y = tiny_batch(dtype=torch.float32, n=8)

    def bad(params, generator):
        return {n: torch.zeros(3) for n in params}

    with pytest.raises(ValueError, match="shape"):
        fm.NRS(noise=bad).backward(model, x, y)
    with pytest.raises(ValueError, match="no perturbation"):
        fm.RPR(noise=lambda p, g: {}).backward(model, x, y)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: fm.NRS(rho=-0.1), "rho"),
        (lambda: fm.NRS(alpha=-1), "alpha"),
        (lambda: fm.NRS(scale="row"), "scale"),
        (lambda: fm.RPR(distribution="cauchy"), "distribution"),
        (lambda: fm.SAM(rho=float("nan")), "rho"),
        (lambda: fm.SAM(rho=True), "rho"),
        (lambda: fm.ASAM(eta=-1), "eta"),
        (lambda: fm.NSO(num_samples=0), "num_samples"),
        (lambda: fm.NSO(num_samples=1.5), "num_samples"),
        (lambda: fm.NSO(lam=1.5), "lam"),
        (lambda: fm.SmoothOut(a=-0.1), "a"),
        (lambda: fm.RWP(mix=2), "mix"),
        (lambda: fm.RWP(gamma="big"), "gamma"),
        (lambda: fm.create_method("adam"), "unknown method"),
        (lambda: fm.create_method("nrs", beta=1), "bad argument"),
        (lambda: fm.RPR(noise=3), "noise"),
    ],
)
def test_bad_arguments_raise_value_error(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_micro_batch_lists_must_match():
    model = bn_net()
    x, y = tiny_batch(dtype=torch.float32, n=8)
    with pytest.raises(ValueError, match="micro-batches"):
        fm.Baseline().backward(model, [x, x], [y])
    with pytest.raises(ValueError, match="both"):
        fm.Baseline().backward(model, [x], y)


@pytest.mark.parametrize("name", ALL)
def test_registry_method_trains_and_round_trips_state(name):
    """Every registered method lowers the loss of a small MLP on a fixed problem."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    method = fm.create_method(name)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    if "optimizer" in method.declared:  # a method that reads the optimizer's state (MSAM)
        method.optimizer = opt
    start = F.cross_entropy(model(x), y).item()
    for _ in range(60):
        method.backward(model, x, y, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
    end = F.cross_entropy(model(x), y).item()
    assert end < 0.5 * start, (start, end)
    clone = fm.create_method(name)
    for k, v in method.hparams().items():  # make the clone differ where a number can
        if isinstance(v, float) and not isinstance(v, bool):
            setattr(clone, k, v / 2)
    clone.load_state_dict(method.state_dict())
    assert clone.hparams() == method.hparams()


@pytest.mark.parametrize("name", ALL)
def test_runs_under_autocast_with_float32_gradients(name):
    model = bn_net()
    x, y = tiny_batch(dtype=torch.float32, n=16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = make(name).backward(model, x, y, scaler=scaler,
                                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.loss)
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
