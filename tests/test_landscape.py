"""fm.landscape: normalization rules and grid values equal to direct evaluation."""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima.landscape as fl


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6, 3)).double()
    net[1].running_mean.uniform_(-0.3, 0.3)
    net[1].running_var.uniform_(0.5, 1.5)
    return net.eval()


def data(n: int = 30, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                generator=g)


def direct(model: nn.Module, x, y, shift: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Reference: copy the model, add the shift in place, evaluate plainly."""
    m = copy.deepcopy(model).eval()
    state = dict(m.named_parameters()) | dict(m.named_buffers())
    with torch.no_grad():
        for n, t in shift.items():
            state[n].add_(t)
        out = m(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_filter_normalization_matches_weight_filter_norms():
    model = small_net()
    d = fl.random_direction(model, generator=gen())
    for name, w in model.named_parameters():
        if w.dim() > 1:
            dn = d[name].reshape(w.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, w.detach().reshape(w.shape[0], -1).norm(dim=1))
        else:
            assert torch.count_nonzero(d[name]) == 0, name
    d_w = fl.random_direction(model, bias_bn="weight", generator=gen())
    torch.testing.assert_close(d_w["1.weight"], model[1].weight.detach())
    d_f = fl.random_direction(model, bias_bn="filter", generator=gen())
    torch.testing.assert_close(d_f["0.bias"].abs(), model[0].bias.detach().abs())
    d_l = fl.random_direction(model, norm="layer", generator=gen())
    assert float(d_l["0.weight"].norm()) == pytest.approx(float(model[0].weight.detach().norm()))
    d_g = fl.random_direction(model, norm="global", params="weights", generator=gen())
    w_norm = torch.sqrt(sum(p.detach().norm() ** 2 for p in model.parameters() if p.dim() > 1))
    assert float(torch.sqrt(sum(t.norm() ** 2 for t in d_g.values()))) == pytest.approx(
        float(w_norm))


def test_line_and_plane_equal_direct_evaluation():
    model, (x, y) = small_net(1), data()
    d1 = fl.random_direction(model, generator=gen(1))
    d2 = fl.random_direction(model, bias_bn="filter", generator=gen(2))
    alphas, betas = torch.linspace(-1, 1, 5), torch.tensor([-0.5, 0.0, 0.7])
    res = fl.plane(model, F.cross_entropy, (x, y), d1, d2, alphas, betas, chunk_size=4)
    assert res.loss.shape == (5, 3) and res.accuracy.shape == (5, 3)
    for i, j in [(0, 0), (2, 1), (4, 2), (1, 2)]:
        shift = {n: alphas[i] * d1[n] + betas[j] * d2[n] for n in d1}
        loss, acc = direct(model, x, y, shift)
        assert float(res.loss[i, j]) == pytest.approx(loss, rel=1e-10)
        assert float(res.accuracy[i, j]) == pytest.approx(acc)
    assert float(res.loss[2, 1]) == pytest.approx(direct(model, x, y, {})[0], rel=1e-12)
    line = fl.line(model, F.cross_entropy, (x, y), d1, alphas)
    torch.testing.assert_close(line.loss, res.loss[:, 1], rtol=1e-10, atol=0)


def test_chunking_and_multi_batch_do_not_change_values():
    model, (x, y) = small_net(2), data(40)
    d = fl.random_direction(model, generator=gen(3))
    alphas = torch.linspace(-2, 2, 9)
    ref = fl.line(model, None, (x, y), d, alphas, chunk_size=1)
    batches = [(x[:13], y[:13]), (x[13:], y[13:])]
    for chunk in (2, 9, None):
        got = fl.line(model, None, batches, d, alphas, chunk_size=chunk)
        torch.testing.assert_close(got.loss, ref.loss, rtol=1e-10, atol=0)
        torch.testing.assert_close(got.accuracy, ref.accuracy)


def test_interpolation_endpoints_are_the_two_models():
    model_a, model_b, (x, y) = small_net(3), small_net(4), data()
    res = fl.interpolate(model_a, model_b, F.cross_entropy, (x, y), [0.0, 0.5, 1.0])
    assert float(res.loss[0]) == pytest.approx(direct(model_a, x, y, {})[0], rel=1e-10)
    assert float(res.loss[2]) == pytest.approx(direct(model_b, x, y, {})[0], rel=1e-10)
    mid = copy.deepcopy(model_a)
    with torch.no_grad():
        for t, tb in zip(mid.state_dict().values(), model_b.state_dict().values(),
                         strict=True):
            if t.is_floating_point():
                t.copy_(0.5 * t + 0.5 * tb)
    assert float(res.loss[1]) == pytest.approx(direct(mid, x, y, {})[0], rel=1e-10)


def test_train_mode_restores_buffers():
    model, (x, y) = small_net(5), data()
    before = {n: b.clone() for n, b in model.state_dict().items()}
    d = fl.random_direction(model, generator=gen())
    res = fl.line(model, None, (x, y), d, [0.0, 0.5], train=True)
    m = copy.deepcopy(model).train()
    with torch.no_grad():
        ref = float(F.cross_entropy(m(x), y))
    assert float(res.loss[0]) == pytest.approx(ref, rel=1e-10)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
    assert not model.training


def test_bad_inputs():
    model, batch = small_net(), data()
    d = fl.random_direction(model, generator=gen())
    with pytest.raises(ValueError, match="'spectral'"):
        fl.random_direction(model, norm="spectral")
    with pytest.raises(ValueError, match="'nope.weight'"):
        fl.line(model, None, batch, {"nope.weight": torch.zeros(1)}, [0.0])
    with pytest.raises(ValueError, match="empty"):
        fl.line(model, None, [], d, [0.0])
    with pytest.raises(ValueError, match="alphas is empty"):
        fl.line(model, None, batch, d, [])
    with pytest.raises(ValueError, match="'fc.weight'"):
        fl.random_direction(model, params=["fc.weight"])


def test_many_weight_sets_share_one_forward_call():
    model, batch = small_net(6), data()
    calls = []
    handle = model.register_forward_pre_hook(lambda _m, _i: calls.append(1))
    try:
        d1 = fl.random_direction(model, generator=gen(1))
        d2 = fl.random_direction(model, generator=gen(2))
        fl.plane(model, None, batch, d1, d2, torch.linspace(-1, 1, 6), torch.linspace(-1, 1, 5),
                 chunk_size=10)
    finally:
        handle.remove()
    assert len(calls) == 3  # 30 grid points, 10 weight sets per vmapped forward


@pytest.mark.parametrize("slow", ["vmap", "single"])
def test_default_times_both_ways_and_keeps_the_faster(monkeypatch, slow):
    """The default evaluates a few points each way on the first batch, keeps the faster way
    for the rest, and every point's value is that of one pass per point."""
    model, batch = small_net(7), data()
    batches = [(batch[0][:12], batch[1][:12]), (batch[0][12:], batch[1][12:])]
    d1 = fl.random_direction(model, generator=gen(1))
    d2 = fl.random_direction(model, generator=gen(2))
    grid = torch.linspace(-1, 1, 5)
    ref = fl.plane(model, None, batches, d1, d2, grid, grid, chunk_size=1)

    run_chunk = fl.PointEvaluator._run_chunk
    sizes: list[int] = []

    def timed_run_chunk(self, points, x, y):
        sizes.append(points.shape[0])
        if (points.shape[0] > 1) == (slow == "vmap"):
            time.sleep(0.02)      # one slow call outweighs four fast ones
        return run_chunk(self, points, x, y)

    monkeypatch.setattr(fl.PointEvaluator, "_run_chunk", timed_run_chunk)
    chosen = []
    decide = fl.PointEvaluator._decide

    def recording_decide(self, chunk, x, y):
        out = decide(self, chunk, x, y)
        chosen.append(self.chunk_size)
        return out

    monkeypatch.setattr(fl.PointEvaluator, "_decide", recording_decide)
    got = fl.plane(model, None, batches, d1, d2, grid, grid)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.accuracy, ref.accuracy)
    assert len(chosen) == 1   # decided once, on the first batch
    # first batch: an untimed warm-up on 2 points, 4 single points, 4 vmapped, then the
    # remaining 17 the chosen way
    assert sizes[:6] == [2, 1, 1, 1, 1, 4]
    if slow == "vmap":
        assert chosen == [1] and sizes[6:] == [1] * (17 + 25)
    else:
        assert chosen[0] > 1 and sizes[6:] == [17, 25]


def test_one_point_leaves_the_choice_open():
    """A basin radius first evaluates the center alone: that decides nothing."""
    model, batch = small_net(8), data()
    ev = fl.PointEvaluator(model, None, batch, [n for n, _ in model.named_parameters()])
    ev.run(lambda a, b: ev.w0[None], 1)
    assert ev.chunk_size is None
    ev.run(lambda a, b: ev.w0[None].repeat(b - a, 1), 10)
    assert ev.chunk_size in (1, ev.max_chunk)


class ItemScale(nn.Module):
    """Scales by a Python float read from its input: vmap cannot batch ``.item()``."""

    def forward(self, x):
        return x * (1.0 + 0.0 * x.flatten()[0].item())


def test_module_vmap_cannot_batch_goes_point_by_point():
    model = nn.Sequential(nn.Linear(4, 3), ItemScale()).double().eval()
    g = gen(3)
    x, y = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,),
                                                                              generator=g)
    d = fl.random_direction(model, generator=gen(4))
    alphas = torch.linspace(-1, 1, 9)
    ref = fl.line(model, None, (x, y), d, alphas, chunk_size=1)
    with pytest.warns(RuntimeWarning, match="vmap failed") as record:
        forced = fl.line(model, None, [(x[:5], y[:5]), (x[5:], y[5:])], d, alphas,
                         chunk_size=4)
    assert len([w for w in record if "vmap failed" in str(w.message)]) == 1  # warned once
    torch.testing.assert_close(forced.loss, ref.loss, rtol=1e-12, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # the default's choice is silent
        default = fl.line(model, None, (x, y), d, alphas)
    torch.testing.assert_close(default.loss, ref.loss, rtol=1e-12, atol=1e-12)
