"""The curvature operator's caches (kept graphs, reused trunk) change speed, never the answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import flatminima.hessian as fh
from flatminima._params import FlatParams
from tests.test_hessian import batch, dense_hessian, gen, tiny_mlp


def split(x, y, sizes=(10, 25, 5)):
    out, start = [], 0
    for s in sizes:
        out.append((x[start : start + s], y[start : start + s]))
        start += s
    return out


def products(op: fh.CurvatureOperator, seed: int = 3) -> torch.Tensor:
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(seed))
    return torch.cat([op.matmat(vs[:2]), op.matvec(vs[2]).unsqueeze(0)])


@pytest.mark.parametrize("curvature,mode", [("hessian", "double_backward"),
                                            ("hessian", "forward_over_reverse"),
                                            ("ggn", "auto")])
def test_last_layer_trunk_is_exact(curvature, mode):
    model, (x, y) = tiny_mlp(2, bn=True), batch(40, seed=5)
    model.eval()
    batches = split(x, y)
    op = fh.CurvatureOperator(model, F.cross_entropy, batches, "last_layer",
                              curvature=curvature, mode=mode)
    assert op.trunk is not None and op.trunk.prefix == "5"
    ref = fh.CurvatureOperator(model, F.cross_entropy, batches, "last_layer",
                               curvature=curvature, mode=mode, reuse_trunk=False)
    assert ref.trunk is None
    h = dense_hessian(model, x, y, ["5.weight", "5.bias"])
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
    got = products(op)
    torch.testing.assert_close(got, products(ref), rtol=1e-10, atol=1e-12)
    # The last layer is linear in its weights, so the GGN equals the Hessian there.
    torch.testing.assert_close(got, vs @ h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.loss(), ref.loss(), rtol=1e-12, atol=0)


def test_trunk_for_a_multi_layer_head_and_one_parameter_of_it():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(5, 6)
            self.head = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model, (x, y) = Net().double().eval(), batch(30, seed=2)
    for names in (["head.0.weight", "head.0.bias", "head.2.weight", "head.2.bias"],
                  ["head.0.weight"]):
        op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), names)
        assert op.trunk is not None and op.trunk.prefix == "head"
        h = dense_hessian(model, x, y, names)
        vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
        torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)


class PostProcessed(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return 2.0 * self.head(torch.tanh(self.body(x)))


class Tied(PostProcessed):
    def forward(self, x):                       # the head's bias also feeds the trunk
        return self.head(torch.tanh(self.body(x) + self.head.bias.sum()))


class CalledTwice(PostProcessed):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(5, 3), nn.Linear(3, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.head(self.body(x))))


@pytest.mark.parametrize("cls", [PostProcessed, Tied, CalledTwice])
def test_trunk_falls_back_when_the_cut_is_not_exact(cls):
    torch.manual_seed(0)
    model, (x, y) = cls().double().eval(), batch(30, seed=4)
    names = ["head.weight", "head.bias"]
    op = fh.CurvatureOperator(model, F.cross_entropy, split(x, y, (12, 18)), names)
    assert op.trunk is None
    h = dense_hessian(model, x, y, names)
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)


def test_no_trunk_in_train_mode_for_all_parameters_or_over_budget():
    model, data = tiny_mlp(1), batch()
    assert fh.CurvatureOperator(model.train(), None, data, "last_layer").trunk is None
    model.eval()
    assert fh.CurvatureOperator(model, None, data).trunk is None          # nothing to skip
    assert fh.CurvatureOperator(model, None, data, "last_layer", memory=0).trunk is None
    assert fh.CurvatureOperator(model, None, data, "last_layer").trunk is not None


def test_graphs_kept_within_budget_and_rebuilt_beyond_it():
    model, (x, y) = tiny_mlp(3), batch(40, seed=6)
    model.eval()
    batches = split(x, y)
    h = dense_hessian(model, x, y)
    kept = fh.CurvatureOperator(model, F.cross_entropy, batches)
    rebuilt = fh.CurvatureOperator(model, F.cross_entropy, batches, memory=0)
    vs = torch.randn(3, kept.size, dtype=torch.float64, generator=gen(3))
    for op, expect in ((kept, True), (rebuilt, False)):
        torch.testing.assert_close(products(op), vs @ h, rtol=1e-10, atol=1e-12)
        assert op.cache_graph is expect
        assert all((g is not None) == expect for g in op._graphs)
    # One batch keeps its graph whatever the budget: rebuilding it needs the same memory.
    single = fh.CurvatureOperator(model, F.cross_entropy, (x, y), memory=0)
    single.matvec(vs[0])
    assert single._graphs[0] is not None


class ConvBN(nn.Module):
    def __init__(self, affine: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3, affine=affine)
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.bn2(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.bn1(self.fc(h))))


def with_running_stats(model: nn.Module) -> nn.Module:
    """``model`` in float64 eval mode with non-trivial running statistics in every BatchNorm."""
    model = model.double()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def dense_reference(model: nn.Module, x, y, curvature: str = "hessian") -> torch.Tensor:
    """The Hessian (or GGN) of the unpatched model (fused BatchNorm kernel) by torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = FlatParams.of(params)
    w0 = flat.flatten(params)

    def f(w):
        return functional_call(model, flat.unflatten(w), (x,))

    if curvature == "hessian":
        return hessian(lambda w: F.cross_entropy(f(w), y))(w0)
    out = f(w0)
    j = jacrev(f)(w0).reshape(-1, w0.numel())
    hl = hessian(lambda o: F.cross_entropy(o.reshape(out.shape), y))(out.reshape(-1))
    return j.T @ hl @ j


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("curvature,mode", [("hessian", "double_backward"),
                                            ("hessian", "forward_over_reverse"),
                                            ("ggn", "auto")])
def test_eval_batchnorm_as_affine_map_is_exact(fold, affine, curvature, mode):
    torch.manual_seed(1)
    model = with_running_stats(ConvBN(affine))
    g = gen(5)
    x, y = torch.randn(12, 2, 4, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (12,))
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y), curvature=curvature, mode=mode,
                              fold_norms=fold)
    assert len(op._norms) == 2
    # conv -> bn2 and fc -> bn1 both fold: each norm's input is a layer output used only there.
    assert op.folds == ([(model.conv, model.bn2), (model.fc, model.bn1)] if fold else [])
    ref = dense_reference(model, x, y, curvature)
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(products(op), vs @ ref, rtol=1e-9, atol=1e-11)
    fused = fh.CurvatureOperator(model, F.cross_entropy, (x, y), curvature=curvature, mode=mode,
                                 affine_norms=False)
    assert fused._norms == []
    torch.testing.assert_close(products(fused), vs @ ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.loss(), F.cross_entropy(model(x), y), rtol=1e-12, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())  # restored


class SharedOutput(nn.Module):
    """conv's output feeds the norm and the residual sum: folding would change the sum."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), \
            nn.Linear(32, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.head(torch.tanh(self.bn(h) + h).flatten(1))


class DetachedUse(SharedOutput):
    """A consumer outside autograd: no graph edge, caught by the output check."""

    def forward(self, x):
        h = self.conv(x)
        return self.head(torch.tanh(self.bn(h) + h.detach().mean()).flatten(1))


class NormAfterActivation(SharedOutput):
    def forward(self, x):
        return self.head(self.bn(torch.tanh(self.conv(x))).flatten(1))


class NormOfAView(SharedOutput):
    def forward(self, x):
        h = self.conv(x)[:, :, :, :]
        return self.head(torch.tanh(self.bn(h)).flatten(1))


class LayerCalledTwice(SharedOutput):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.conv(self.conv(x)))).flatten(1))


class GroupedNoAffine(nn.Module):
    """A grouped, biased convolution into a BatchNorm without affine parameters: folds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4, affine=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


class FixedBatch(GroupedNoAffine):
    """Works only at the batch size it was written for: the probe on a few rows fails."""

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).reshape(10, 64))


@pytest.mark.parametrize("cls,folded", [(SharedOutput, False), (DetachedUse, False),
                                        (NormAfterActivation, False), (NormOfAView, False),
                                        (LayerCalledTwice, False), (GroupedNoAffine, True),
                                        (FixedBatch, False)])
def test_batchnorm_folds_only_where_exact(cls, folded):
    torch.manual_seed(2)
    model = with_running_stats(cls())
    g = gen(6)
    x, y = torch.randn(10, 2, 4, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (10,))
    op = fh.CurvatureOperator(model, F.cross_entropy, (x, y))
    assert op.folds == ([(model.conv, model.bn)] if folded else [])
    ref = dense_reference(model, x, y)
    vs = torch.randn(3, op.size, dtype=torch.float64, generator=gen(3))
    torch.testing.assert_close(products(op), vs @ ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(op.loss(), F.cross_entropy(model(x), y), rtol=1e-12, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_batchnorm_in_train_mode_is_left_alone():
    from flatminima.hessian._eval_norm import eval_batchnorms

    model = ConvBN()
    assert eval_batchnorms(model.train()) == []
    assert len(eval_batchnorms(model.eval())) == 2
    model.bn1.track_running_stats, model.bn1.running_mean, model.bn1.running_var = False, None, None
    assert eval_batchnorms(model) == [model.bn2]      # no running statistics: batch statistics


def test_unflatten_is_one_split_so_its_backward_is_one_concatenation():
    # A slice per parameter would make the gradient with respect to the flat vector fill and
    # add a full-size zero vector per parameter (a third of a product on ResNet-18).
    shapes = {f"p{i}": torch.Size((3, i + 1)) for i in range(6)}
    flat = FlatParams(tuple(shapes), tuple(shapes.values()),
                      tuple(int(s.numel()) for s in shapes.values()))
    w = torch.randn(flat.size, requires_grad=True)
    pieces = flat.unflatten(w)
    parents = {t.grad_fn.next_functions[0][0] for t in pieces.values()}
    assert len(parents) == 1 and "Split" in type(parents.pop()).__name__
    assert all(t.shape == shapes[n] for n, t in pieces.items())
    grads = {n: torch.full(s, float(i)) for i, (n, s) in enumerate(shapes.items())}
    (gw,) = torch.autograd.grad(list(pieces.values()), w, list(grads.values()))
    assert torch.equal(gw, flat.flatten(grads))
    batched = flat.unflatten(torch.arange(2 * flat.size, dtype=torch.float32).view(2, -1))
    assert batched["p2"].shape == (2, 3, 3)
    assert torch.equal(batched["p0"][1].flatten(), torch.arange(flat.size, flat.size + 3.0))
