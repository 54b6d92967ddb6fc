"""The SAM family beyond one step and one ascent: FriendlySAM's moving average over several steps
and across a resume, m-sharpness against brute force, and the members' limiting cases.

The registry-wide tests cover each member's single-step gradient (tests/_method_refs.py) and
every shared guarantee at the default ``m=None``; the guarantees under ``m=`` are checked here.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from flatminima.methods import Passes
from flatminima.methods._base import poison_grads
from tests._method_refs import (
    TEST_HPARAMS,
    friendly_sam_ref_steps,
    m_sharpness_ref,
    tiny_batch,
    tiny_mlp,
)

FAMILY = ["sam", "asam", "gsam", "wsam", "gcsam", "friendlysam", "fisher_sam"]


def make(name, **extra):
    return fm.create_method(name, **dict(TEST_HPARAMS[name], **extra))


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def bn_dropout_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 3)).double()


# ----------------------------------------------------------------------------- FriendlySAM


def sgd_steps(method, model, batches, lr, start=0):
    """Run ``method`` with plain SGD over ``batches``; the accumulated gradient of each step."""
    out = []
    for x, y in batches[start:]:
        method.backward(model, x, y)
        out.append(grads_of(model))
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
        model.zero_grad(set_to_none=True)
    return out


def friendly_batches(k=4):
    return [tiny_batch(seed=20 + i, n=10) for i in range(k)]


def test_friendlysam_moving_average_matches_reference_over_several_steps():
    hp = TEST_HPARAMS["friendlysam"]
    model = tiny_mlp(seed=2)
    batches = friendly_batches()
    want = friendly_sam_ref_steps(hp, copy.deepcopy(model), batches, lr=0.3)
    got = sgd_steps(make("friendlysam"), model, batches, lr=0.3)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-10, atol=1e-12, msg=f"{step} {n}")
    # The estimate is not SAM's: from the second step on the ascent differs.
    sam = sgd_steps(fm.SAM(rho=hp["rho"]), tiny_mlp(seed=2), batches, lr=0.3)
    assert torch.equal(sam[0]["0.weight"], got[0]["0.weight"])
    assert not torch.allclose(sam[1]["0.weight"], got[1]["0.weight"])


def test_friendlysam_with_m_sharpness_matches_reference_over_several_steps():
    hp = TEST_HPARAMS["friendlysam"]
    model = tiny_mlp(seed=2)
    batches = friendly_batches(3)
    want = friendly_sam_ref_steps(hp, copy.deepcopy(model), batches, lr=0.3, m=4)
    got = sgd_steps(make("friendlysam", m=4), model, batches, lr=0.3)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-10, atol=1e-12, msg=f"{step} {n}")


def test_friendlysam_resumes_bitwise_from_its_state_dict():
    batches = friendly_batches()
    model = tiny_mlp(seed=2)
    straight = sgd_steps(make("friendlysam"), copy.deepcopy(model), batches, lr=0.3)

    first = make("friendlysam")
    sgd_steps(first, model, batches[:2], lr=0.3)
    state = first.state_dict()
    assert set(state) == {"rho", "sigma", "lmbda", "momentum"}
    buf = io.BytesIO()  # as a checkpoint stores it, and loads it (weights_only)
    torch.save({"method": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["method"]
    second = fm.create_method("friendlysam")
    second.load_state_dict(loaded)
    assert second.hparams() == first.hparams()
    resumed = sgd_steps(second, model, batches, lr=0.3, start=2)
    for g, w in zip(resumed, straight[2:], strict=True):
        for n in w:
            assert torch.equal(g[n], w[n]), n


def test_friendlysam_micro_batches_keep_the_estimate_of_the_full_batch():
    batches = friendly_batches(3)
    full = sgd_steps(make("friendlysam"), tiny_mlp(seed=2), batches, lr=0.3)
    split = [([x[:3], x[3:]], [y[:3], y[3:]]) for x, y in batches]
    parts = sgd_steps(make("friendlysam"), tiny_mlp(seed=2), split, lr=0.3)
    for g, w in zip(parts, full, strict=True):
        for n in w:
            torch.testing.assert_close(g[n], w[n], rtol=1e-10, atol=1e-12)


def test_friendlysam_skips_the_estimate_on_an_overflow_and_refuses_another_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = tiny_batch(dtype=torch.float32, n=16)
    method = make("friendlysam")
    method.backward(model, x, y)
    before = {n: t.clone() for n, t in method.state_dict()["momentum"].items()}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    method.backward(model, x, y, lambda out, t: F.cross_entropy(out, t) * 1e6, scaler=scaler)
    for n, t in method.state_dict()["momentum"].items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(ValueError, match="momentum"):
        method.backward(tiny_mlp(), *tiny_batch())


# ----------------------------------------------------------------------------- m-sharpness


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("m", [1, 3, 4])
def test_m_sharpness_matches_brute_force_per_group(name, m):
    model = tiny_mlp(seed=4)
    x, y = tiny_batch(seed=5, n=10)  # m = 3, 4: a smaller last group, weighted by its size
    result = make(name, m=m).backward(model, x, y)
    want = m_sharpness_ref(name, TEST_HPARAMS[name], model, x, y, m)
    got = grads_of(model)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(result.loss, F.cross_entropy(model(x), y).detach())
    assert result.perturbed_loss is not None


@pytest.mark.parametrize("name", FAMILY)
def test_m_sharpness_groups_do_not_depend_on_the_micro_batches(name):
    model = tiny_mlp(seed=4)
    twin = copy.deepcopy(model)
    x, y = tiny_batch(seed=5, n=10)
    full = make(name, m=4).backward(model, x, y)
    # Groups [0:4] [4:8] [8:10] across micro-batches [0:3] [3:7] [7:10]: pieces share an ascent.
    cuts = [slice(0, 3), slice(3, 7), slice(7, 10)]
    parts = make(name, m=4).backward(twin, [x[c] for c in cuts], [y[c] for c in cuts])
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(full.loss, parts.loss)
    torch.testing.assert_close(full.logits, parts.logits)
    torch.testing.assert_close(full.perturbed_loss, parts.perturbed_loss)


def legacy_sam(model, inputs, targets, rho):
    """SAM as it was before m-sharpness, through the pass primitive: the bitwise baseline."""
    step = Passes(model, inputs, targets, F.cross_entropy)
    params = dict(model.named_parameters())
    names, tensors = list(params), list(params.values())
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    for mb in step:
        clean = mb.forward()
        for n, g in zip(names, mb.gradient(clean.loss, tensors), strict=True):
            if g is not None:
                grads[n] += g
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    e = {n: g * (rho / (float(norm) + 1e-12)) for n, g in grads.items()}
    for mb in step:
        mb.backward(mb.forward(e, final=True).loss)
    if not all(bool(torch.isfinite(g).all()) for g in grads.values()):
        poison_grads(tensors)
    return step.result()


@pytest.mark.parametrize("micro", [False, True])
def test_m_none_and_one_whole_group_are_plain_sam_bitwise(micro):
    x, y = tiny_batch(n=12)
    if micro:
        x, y = [x[:5], x[5:]], [y[:5], y[5:]]
    runs = []
    for m in ("legacy", None, 12, 100):
        model = bn_dropout_net()
        torch.manual_seed(9)  # the dropout masks
        if m == "legacy":
            result = legacy_sam(model, x, y, 0.3)
        else:
            result = fm.SAM(rho=0.3, m=m).backward(model, x, y)
        runs.append((grads_of(model), [b.clone() for b in model.buffers()], result))
    (g0, b0, r0) = runs[0]
    for g, b, r in runs[1:]:
        for n in g0:
            assert torch.equal(g[n], g0[n]), n
        for u, v in zip(b, b0, strict=True):
            assert torch.equal(u, v)
        assert torch.equal(r.loss, r0.loss) and torch.equal(r.logits, r0.logits)
        assert torch.equal(r.perturbed_loss, r0.perturbed_loss)


@pytest.mark.parametrize("name", FAMILY)
def test_m_sharpness_keeps_weights_and_updates_statistics_once_per_micro_batch(name):
    model = bn_dropout_net()
    reference = copy.deepcopy(model)
    before = {n: t.clone() for n, t in model.named_parameters()}
    x, y = tiny_batch(n=12)
    make(name, m=4).backward(model, [x[:6], x[6:]], [y[:6], y[6:]])
    for n, t in model.named_parameters():
        assert torch.equal(t, before[n]), n
    reference.eval()  # dropout aside, one clean forward per micro-batch in training mode
    for mod in reference.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.train()
    with torch.no_grad():
        reference(x[:6])
        reference(x[6:])
    for (n, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, r), n


@pytest.mark.parametrize("name", FAMILY)
def test_m_sharpness_with_scaler_equals_without_and_skips_on_overflow(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    twin = copy.deepcopy(model)
    x, y = tiny_batch(dtype=torch.float32, n=16)
    make(name, m=5).backward(model, x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    make(name, m=5).backward(twin, x, y, scaler=scaler)
    scaler.unscale_(torch.optim.SGD(twin.parameters(), lr=0.1))
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=n)
    before = copy.deepcopy(model.state_dict())
    model.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make(name, m=5).backward(model, x, y, lambda out, t: F.cross_entropy(out, t) * 1e6,
                             scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**127
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


@pytest.mark.parametrize("name", FAMILY)
def test_m_sharpness_under_ddp_synchronizes_once_on_the_last_pass(name, process_group):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = nn.parallel.DistributedDataParallel(inner)
    seen: list[tuple[bool, bool]] = []
    inner.register_forward_pre_hook(
        lambda _m, _i: seen.append((torch.is_grad_enabled(), model.require_backward_grad_sync)))
    x, y = tiny_batch(dtype=torch.float32, n=12)
    # Groups [0:4] [4:8] [8:12] over micro-batches [0:6] [6:12]: four pieces, two per group.
    make(name, m=4).backward(model, [x[:6], x[6:]], [y[:6], y[6:]])
    synced = [i for i, (graph, sync) in enumerate(seen) if graph and sync]
    graphs = [i for i, (graph, _) in enumerate(seen) if graph]
    assert len(synced) == 1 and synced[0] == graphs[-1], seen
    assert all(p.grad is not None for p in inner.parameters())


def test_m_must_be_a_positive_integer():
    for bad in (0, -2, 2.5, True, "4"):
        with pytest.raises(ValueError, match="m must be"):
            fm.SAM(m=bad)


# ----------------------------------------------------------------------------- limiting cases


def test_gsam_alpha_zero_and_wsam_half_are_sam_and_wsam_zero_is_the_plain_gradient():
    x, y = tiny_batch(n=10)

    def run(method):
        model = tiny_mlp(seed=6)
        method.backward(model, x, y)
        return grads_of(model)

    sam = run(fm.SAM(rho=0.2))
    plain = run(fm.create_method("baseline"))
    for other, want in ((fm.create_method("gsam", rho=0.2, alpha=0.0), sam),
                        (fm.create_method("wsam", rho=0.2, gamma=0.5), sam),
                        (fm.create_method("wsam", rho=0.2, gamma=0.0), plain),
                        (fm.create_method("friendlysam", rho=0.2, sigma=0.0), sam)):
        got = run(other)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=1e-14, msg=repr(other))


def test_gsam_removes_the_orthogonal_part_of_the_clean_gradient():
    """<grad - g_p, g_p> = 0: GSAM changes SAM's gradient only orthogonally to it."""
    x, y = tiny_batch(n=10)
    model = tiny_mlp(seed=6)
    fm.create_method("gsam", rho=0.2, alpha=0.9).backward(model, x, y)
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    fm.SAM(rho=0.2).backward(model, x, y)
    gp = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert abs(float((got - gp) @ gp)) < 1e-10 * float(gp @ gp)  # 1e-12 in the division
    assert not torch.allclose(got, gp)


def test_gcsam_centralizes_the_ascent_of_matrices_only():
    from flatminima.methods.gcsam import centralize

    w = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    torch.testing.assert_close(centralize(w), torch.tensor([[-2.0, -1.0, 3.0], [-1.0, -1.0, 2.0]]))
    b = torch.tensor([1.0, 5.0])
    assert centralize(b) is b
    conv = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    assert torch.allclose(centralize(conv).sum(dim=(1, 2, 3)), torch.zeros(4, dtype=torch.float64))


def test_bad_family_arguments_are_value_errors_naming_them():
    for factory, match in ((lambda: fm.create_method("wsam", gamma=1.0), "gamma"),
                           (lambda: fm.create_method("gsam", alpha=-0.1), "alpha"),
                           (lambda: fm.create_method("friendlysam", lmbda=1.5), "lmbda"),
                           (lambda: fm.create_method("friendlysam", sigma=-1), "sigma")):
        with pytest.raises(ValueError, match=match):
            factory()


def test_friendlysam_state_moves_between_a_plain_and_a_ddp_model(process_group):
    x, y = tiny_batch(n=10)
    plain = tiny_mlp(seed=2)
    method = make("friendlysam")
    method.backward(plain, x, y)
    assert set(method.state_dict()["momentum"]) == {n for n, _ in plain.named_parameters()}
    ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(plain))
    other = fm.create_method("friendlysam")
    other.load_state_dict(method.state_dict())
    plain.zero_grad()
    method.backward(plain, x, y)
    other.backward(ddp, x, y)
    for (n, p), q in zip(plain.named_parameters(), ddp.module.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14, msg=n)
    assert set(other.state_dict()["momentum"]) == set(method.state_dict()["momentum"])
