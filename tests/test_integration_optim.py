"""The closure-style optimizer: the gradient that reaches the base optimizer is the method's.

Both forms are checked against ``method.backward`` on an identical model, batch and noise: the
closure form for every registered method (bitwise path through ``ModelLoss``), the two-step form
(``first_step`` / ``second_step`` around the user's own passes) for the methods of that shape.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from flatminima.integrations import FlatOptimizer
from tests._method_refs import tiny_batch, tiny_mlp

# ESAM calls loss_fn(outputs, targets) per example: a closure cannot answer that.
CLOSURE_METHODS = [n for n in fm.list_methods() if n != "esam"]
TWO_STEP = ["baseline", "sam", "asam", "rpr", "smoothout", "adasmoothout", "rwp"]


def _method(name: str, opt: torch.optim.Optimizer | None = None) -> fm.Method:
    method = fm.create_method(name)
    if "optimizer" in method.declared:
        method.optimizer = opt
    return method


def _pair(name: str):
    """The same model twice, each with SGD and a fresh method, noise from equal generators."""
    model = tiny_mlp()
    twin = copy.deepcopy(model)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    flat = FlatOptimizer(model, base, _method(name), generator=torch.Generator().manual_seed(5))
    ref = _method(name, ref_opt)
    return model, flat, twin, ref_opt, ref, torch.Generator().manual_seed(5)


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", CLOSURE_METHODS)
def test_closure_step_accumulates_the_methods_gradient_over_steps(name):
    model, flat, twin, ref_opt, ref, gen = _pair(name)
    for step in range(3):  # three steps: MSAM's momentum and the stateful methods' estimates
        x, y = tiny_batch(seed=10 + step)

        def closure(x=x, y=y):
            out = model(x)
            return F.cross_entropy(out, y), out

        flat.backward(closure)
        got = _grads(model)
        ref.backward(twin, x, y, generator=gen)
        for a, b in zip(got, _grads(twin), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        flat.step()  # no closure: the base optimizer steps on p.grad as it is
        ref_opt.step()
        flat.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_step_with_a_closure_steps_and_returns_the_clean_loss():
    model, flat, twin, ref_opt, ref, gen = _pair("nrs")
    x, y = tiny_batch()
    loss = flat.step(lambda: (F.cross_entropy(model(x), y), model(x)))
    result = ref.backward(twin, x, y, generator=gen)
    ref_opt.step()
    assert float(loss) == pytest.approx(float(result.loss), rel=1e-12)
    assert flat.last_result is not None and flat.last_result.divergence is not None
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_closure_that_calls_backward_and_esam_are_refused_with_the_reason():
    model = tiny_mlp()
    x, y = tiny_batch()
    flat = FlatOptimizer(model, torch.optim.SGD, fm.SAM(), lr=0.1)

    def old_style():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="must return the loss"):
        flat.step(old_style)
    esam = FlatOptimizer(model, torch.optim.SGD, fm.ESAM(), lr=0.1)
    with pytest.raises(TypeError, match="per-example losses"):
        esam.step(lambda: F.cross_entropy(model(x), y))


def test_nrs_needs_the_logits_from_the_closure():
    model = tiny_mlp()
    x, y = tiny_batch()
    flat = FlatOptimizer(model, torch.optim.SGD, fm.NRS(), lr=0.1)
    with pytest.raises(ValueError, match=r"return \(loss, outputs\)"):
        flat.step(lambda: F.cross_entropy(model(x), y))


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("name", TWO_STEP)
def test_two_step_form_equals_the_method_and_updates_statistics_once(name):
    torch.manual_seed(0)
    model = _BNNet().double()
    twin = copy.deepcopy(model)
    flat = FlatOptimizer(model, torch.optim.SGD, _method(name), lr=0.1, momentum=0.9,
                         generator=torch.Generator().manual_seed(5))
    ref_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    ref, gen = _method(name), torch.Generator().manual_seed(5)
    for step in range(2):
        x, y = tiny_batch(seed=20 + step)
        F.cross_entropy(model(x), y).backward()
        flat.first_step(zero_grad=True)
        stats = model.body[1].running_mean.clone()
        F.cross_entropy(model(x), y).backward()
        assert torch.equal(model.body[1].running_mean, stats)  # frozen in the second pass
        flat.second_step()
        ref.backward(twin, x, y, generator=gen)
        ref_opt.step()
        flat.zero_grad()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(model.body[1].running_mean, twin.body[1].running_mean)


@pytest.mark.parametrize("name", ["sam", "rpr", "rwp"])
def test_two_step_form_restores_the_weights_bitwise(name):
    model = _BNNet().double()
    before = [p.detach().clone() for p in model.parameters()]
    flat = FlatOptimizer(model, torch.optim.SGD, _method(name), lr=0.0,
                         generator=torch.Generator().manual_seed(5))
    x, y = tiny_batch()
    F.cross_entropy(model(x), y).backward()
    flat.first_step(zero_grad=True)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    F.cross_entropy(model(x), y).backward()
    flat.second_step(zero_grad=True)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_two_step_form_refuses_methods_of_another_shape_and_misuse():
    model = tiny_mlp()
    for method in (fm.NRS(), fm.GSAM(), fm.SAM(m=2)):
        with pytest.raises(NotImplementedError, match="step\\(closure\\)"):
            FlatOptimizer(model, torch.optim.SGD, method, lr=0.1).first_step()
    flat = FlatOptimizer(model, torch.optim.SGD, fm.SAM(), lr=0.1)
    with pytest.raises(RuntimeError, match="without first_step"):
        flat.second_step()


def test_schedulers_state_and_construction_errors():
    model = tiny_mlp()
    flat = FlatOptimizer(model, torch.optim.SGD, "friendlysam", lr=0.4, momentum=0.9,
                         generator=torch.Generator().manual_seed(1))
    sched = torch.optim.lr_scheduler.StepLR(flat, step_size=1, gamma=0.5)
    x, y = tiny_batch()
    flat.step(lambda: F.cross_entropy(model(x), y))
    sched.step()
    assert flat.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    state = flat.state_dict()
    other = FlatOptimizer(tiny_mlp(), torch.optim.SGD, fm.FriendlySAM(), lr=0.4, momentum=0.9,
                          generator=torch.Generator())
    other.load_state_dict(state)
    assert other.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.2)
    assert torch.equal(other.generator.get_state(), flat.generator.get_state())
    assert set(other.method.state_dict()) == set(flat.method.state_dict())
    with pytest.raises(ValueError, match="state of method 'friendlysam'"):
        FlatOptimizer(tiny_mlp(), torch.optim.SGD, fm.SAM(), lr=0.1).load_state_dict(state)
    with pytest.raises(ValueError, match="base_optimizer must be"):
        FlatOptimizer(model, "sgd", fm.SAM())
    with pytest.raises(ValueError, match="takes no params="):
        FlatOptimizer(model, flat.base_optimizer, fm.SAM(), lr=0.1)
