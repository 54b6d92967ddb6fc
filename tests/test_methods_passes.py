"""The pass primitive itself (RNG replay, frozen statistics, DDP no_sync placement, gathered
outputs), and each of its guarantees once for every registered method."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm
from flatminima.methods import Passes
from tests._method_refs import TEST_HPARAMS, tiny_batch

ALL = fm.list_methods()


def make(name, **extra):
    return fm.create_method(name, **dict(TEST_HPARAMS[name], **extra))


def zeros_like_params(model):
    return {n: torch.zeros_like(p) for n, p in model.named_parameters()}


def dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 3)).double()


def test_rng_is_replayed_before_every_pass_of_a_micro_batch_and_across_sweeps():
    model = dropout_net()
    x, y = tiny_batch(n=8)
    step = Passes(model, [x[:4], x[4:]], [y[:4], y[4:]], F.cross_entropy)
    u = zeros_like_params(model)  # at w + 0 the outputs differ only by the dropout masks
    first = [mb.forward().outputs for mb in step]
    again = [mb.forward(u, grad=False).outputs for mb in step]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    # Without the replay the masks differ (so the test above can fail).
    assert not torch.equal(model(x[:4]), model(x[:4]))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_only_the_clean_pass_updates_normalization_statistics(momentum):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, momentum=momentum), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    x, y = tiny_batch(dtype=torch.float32, n=16)
    step = Passes(model, x, y, F.cross_entropy)
    (mb,) = step
    u = {n: 0.1 * torch.randn_like(p) for n, p in model.named_parameters()}
    before = {n: b.clone() for n, b in model.named_buffers()}
    perturbed = mb.forward(u)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    mb.forward()
    with torch.no_grad():
        reference(x)
    for (n, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, r), n
    # The perturbed pass still normalized with batch statistics (training mode).
    with torch.no_grad():
        h = F.linear(x, model[0].weight + u["0.weight"], model[0].bias + u["0.bias"])
        bn = model[1]
        h = F.batch_norm(h, None, None, bn.weight + u["1.weight"], bn.bias + u["1.bias"],
                         training=True)
        want = F.linear(h, model[2].weight + u["2.weight"], model[2].bias + u["2.bias"])
    torch.testing.assert_close(perturbed.outputs.detach(), want)


def test_outputs_and_losses_are_gathered_over_micro_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = tiny_batch(n=10)
    parts = [slice(0, 3), slice(3, 10)]
    step = Passes(model, [x[s] for s in parts], [y[s] for s in parts], F.cross_entropy)
    u = {n: 0.05 * torch.ones_like(p) for n, p in model.named_parameters()}
    for mb in step:
        mb.forward(grad=False)
        mb.forward(u, grad=False, loss_weight=2.0)
        mb.forward({n: -t for n, t in u.items()}, grad=False, loss_weight=1.0)
    result = step.result()
    torch.testing.assert_close(result.logits, model(x).detach())
    torch.testing.assert_close(result.loss, F.cross_entropy(model(x), y).detach())
    with torch.no_grad():
        plus = torch.func.functional_call(model, {n: p + u[n] for n, p in
                                                   model.named_parameters()}, (x,))
        minus = torch.func.functional_call(model, {n: p - u[n] for n, p in
                                                    model.named_parameters()}, (x,))
    want = 0.0
    for s in parts:
        n_m = (s.stop - s.start) / 10
        want += n_m * (2 * F.cross_entropy(plus[s], y[s]) + F.cross_entropy(minus[s], y[s])) / 3
    torch.testing.assert_close(result.perturbed_loss, want)


def test_a_forward_with_a_graph_after_the_final_one_is_refused():
    model = dropout_net()
    x, y = tiny_batch(n=4)
    (mb,) = Passes(model, x, y, F.cross_entropy)
    mb.forward(zeros_like_params(model), final=True)
    mb.forward(grad=False)  # no graph: allowed
    with pytest.raises(RuntimeError, match="after the final"):
        mb.forward()


@pytest.mark.parametrize("micro", [1, 3])
@pytest.mark.parametrize("name", ALL)
def test_ddp_synchronizes_on_exactly_one_forward_the_last_with_a_graph(name, micro,
                                                                       process_group):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = nn.parallel.DistributedDataParallel(inner)
    seen: list[tuple[bool, bool]] = []  # (graph, synchronized) of every forward of the model
    inner.register_forward_pre_hook(
        lambda _m, _i: seen.append((torch.is_grad_enabled(), model.require_backward_grad_sync)))
    x, y = tiny_batch(dtype=torch.float32, n=12)
    if micro > 1:
        x, y = list(x.chunk(micro)), list(y.chunk(micro))
    make(name).backward(model, x, y, generator=torch.Generator().manual_seed(0))
    synced = [i for i, (graph, sync) in enumerate(seen) if graph and sync]
    graphs = [i for i, (graph, _) in enumerate(seen) if graph]
    assert len(synced) == 1, seen
    assert synced[0] == graphs[-1], seen
    assert all(p.grad is not None for p in inner.parameters())


class LogitsAndFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        return self.head(h), h


@pytest.mark.parametrize("name", ALL)
def test_a_model_returning_a_tuple_trains_on_its_first_element(name):
    torch.manual_seed(0)
    model = LogitsAndFeatures().double()
    plain = copy.deepcopy(model)
    plain.forward = lambda x: LogitsAndFeatures.forward(plain, x)[0]
    x, y = tiny_batch(n=10)
    got = make(name).backward(model, x, y, generator=torch.Generator().manual_seed(3))
    want = make(name).backward(plain, x, y, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.loss, want.loss)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_model_returning_something_else_is_a_clear_error():
    class Dict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.lin(x)}

    x, y = tiny_batch(dtype=torch.float32)
    with pytest.raises(ValueError, match="returned dict"):
        fm.Baseline().backward(Dict(), x, y)


@pytest.mark.parametrize("name", ALL)
def test_instance_norm_statistics_are_updated_once_too(name):
    # InstanceNorm updates running statistics whenever it is handed them, even with
    # track_running_stats off: the primitive hides its buffers during perturbed passes.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True),
                          nn.Flatten(), nn.Linear(32, 3))
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 2, 10), torch.randint(0, 3, (8,))
    make(name).backward(model, x, y, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference(x)
    for (n, b), r in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, r), n
