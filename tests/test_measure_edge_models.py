"""Landscape, basin-radius and divergence measurements on models of unusual shape: a 0-dim
parameter, a head registered before the body, tuple outputs, directions keyed in another order.
Each is checked against a direct evaluation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima as fm


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Tempered(nn.Module):
    """Logits divided by a learned scalar temperature: a 0-dim parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.log_t = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) / self.log_t.exp()


class HeadFirst(nn.Module):
    """The classifier is registered before the body; it runs last."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


class WithAux(nn.Module):
    """Returns (logits, auxiliary logits), as some detection/inception models do."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.aux = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), self.aux(x)


def data(n: int = 24):
    g = gen(1)
    return (torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def direct_loss(model, loss_fn, batch, direction, t: float) -> float:
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in moved.named_parameters():
            if n in direction:
                p.add_(t * direction[n])
    with torch.no_grad():
        return float(loss_fn(moved.eval()(batch[0]), batch[1]))


def test_a_zero_dim_parameter_is_measured():
    model, batch = Tempered().double(), data()
    d = fm.landscape.random_direction(model, generator=gen())
    assert d["log_t"].shape == ()
    line = fm.landscape.line(model, F.cross_entropy, batch, d, [-0.5, 0.5])
    for i, t in enumerate((-0.5, 0.5)):
        assert float(line.loss[i]) == pytest.approx(
            direct_loss(model, F.cross_entropy, batch, d, t), rel=1e-12)
    r = fm.volume.basin_radius(model, F.cross_entropy, batch, num_directions=2, generator=gen())
    assert r.dim == 16 and bool((r.radii > 0).all())
    div = fm.divergence.model_divergence(model, batch, rho=0.05, num_samples=2, generator=gen())
    assert div >= 0
    # The Hessian over it, against the dense one.
    x, y = batch
    # named_parameters() order: the module's own log_t, then lin.weight, lin.bias.
    assert [n for n, _ in model.named_parameters()] == ["log_t", "lin.weight", "lin.bias"]
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(flat):
        log_t, weight, bias = flat[0], flat[1:13].view(3, 4), flat[13:16]
        return F.cross_entropy((x @ weight.T + bias) / log_t.exp(), y)

    ref = torch.linalg.eigvalsh(torch.func.hessian(loss)(w)).flip(0)[:2]
    got = fm.hessian.eigenvalues(model, F.cross_entropy, batch, k=2, generator=gen())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_last_layer_is_found_in_execution_order_by_every_measurement():
    model, batch = HeadFirst().double(), data()
    head = ["head.weight", "head.bias"]
    r = fm.volume.basin_radius(model, F.cross_entropy, batch, num_directions=3,
                               params="last_layer", generator=gen())
    r_head = fm.volume.basin_radius(model, F.cross_entropy, batch, num_directions=3,
                                    params=head, generator=gen())
    assert r.dim == 27
    torch.testing.assert_close(r.radii, r_head.radii)
    div = fm.divergence.model_divergence(model, batch, rho=0.1, num_samples=3,
                                         params="last_layer", generator=gen())
    div_head = fm.divergence.model_divergence(model, batch, rho=0.1, num_samples=3,
                                              params=head, generator=gen())
    assert div == pytest.approx(div_head, rel=1e-12)
    d = fm.landscape.random_direction(model, params="last_layer", example_input=batch[0],
                                      generator=gen())
    assert sorted(d) == sorted(head)


def test_tuple_outputs_give_the_loss_and_nan_accuracy():
    model, batch = WithAux().double(), data()

    def loss_fn(out, y):
        main, aux = out
        return F.cross_entropy(main, y) + 0.4 * F.cross_entropy(aux, y)

    d = fm.landscape.random_direction(model, generator=gen())
    line = fm.landscape.line(model, loss_fn, batch, d, [0.0, 0.7])
    assert float(line.loss[1]) == pytest.approx(direct_loss(model, loss_fn, batch, d, 0.7),
                                                rel=1e-12)
    assert bool(line.accuracy.isnan().all())
    r = fm.volume.basin_radius(model, loss_fn, batch, num_directions=2, generator=gen())
    assert bool((r.radii > 0).all())


def test_directions_keyed_in_another_order_give_the_same_plane():
    model, batch = HeadFirst().double(), data()
    d1 = fm.landscape.random_direction(model, generator=gen(2))
    d2 = fm.landscape.random_direction(model, generator=gen(3))
    d2_reversed = dict(reversed(list(d2.items())))
    grid = torch.linspace(-0.5, 0.5, 3)
    a = fm.landscape.plane(model, F.cross_entropy, batch, d1, d2, grid, grid)
    b = fm.landscape.plane(model, F.cross_entropy, batch, d1, d2_reversed, grid, grid)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="different parameters"):
        fm.landscape.plane(model, F.cross_entropy, batch, d1, {"head.bias": d2["head.bias"]},
                           grid, grid)


@pytest.mark.parametrize("loss_name", ["mse_loss", "huber_loss"])
def test_ggn_of_regression_losses_matches_dense(loss_name):
    # PyTorch's forward mode fails inside these losses' backward; the GGN does without it.
    from tests.test_hessian import dense_ggn

    loss_fn = getattr(F, loss_name)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(8, 4, dtype=torch.float64)
    t = 2 * torch.randn(8, 3, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(dense_ggn(model, x, t, loss_fn)).flip(0)[:3]
    got = fm.hessian.eigenvalues(model, loss_fn, (x, t), k=3, curvature="ggn", generator=gen())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="mode='double_backward'"):
        fm.hessian.eigenvalues(model, loss_fn, (x, t), mode="forward_over_reverse")


def test_a_last_layer_batchnorm_after_a_frozen_linear():
    # The last layer is the BatchNorm; folding it into the Linear before it (outside the part
    # that the products run through) would lose the selected weights.
    from torch.func import functional_call, hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4)).double().eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(16, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    fixed = {n: p.detach() for n, p in model.named_parameters() if n.startswith("0.")}

    def loss(w):
        return F.cross_entropy(functional_call(model, {**fixed, "1.weight": w[:4],
                                                      "1.bias": w[4:]}, (x,)), y)

    w0 = torch.cat([model[1].weight.detach(), model[1].bias.detach()])
    ref = torch.linalg.eigvalsh(hessian(loss)(w0)).flip(0)[:2]
    got = fm.hessian.eigenvalues(model, F.cross_entropy, (x, y), k=2, params="last_layer",
                                 generator=gen())
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_a_selection_the_loss_does_not_use_has_zero_curvature():
    model, batch = HeadFirst().double(), data()
    model.unused = nn.Linear(2, 2).double()
    names = ["unused.weight", "unused.bias"]
    assert fm.hessian.eigenvalues(model, F.cross_entropy, batch, params=names).item() == 0
    assert float(fm.hessian.trace(model, F.cross_entropy, batch, 10, params=names,
                                  generator=gen())) == 0


@pytest.mark.parametrize("options", [{"mode": "forward_over_reverse"}, {"curvature": "ggn"}])
def test_an_unused_selection_through_every_product_path(options):
    # Also the gradient start of k=1, which reads the gradient without kept graphs here.
    model, batch = HeadFirst().double(), data()
    model.unused = nn.Linear(2, 2).double()
    names = ["unused.weight", "unused.bias"]
    assert fm.hessian.eigenvalues(model, F.cross_entropy, batch, params=names,
                                  **options).item() == 0
    op = fm.hessian.CurvatureOperator(model, F.cross_entropy, batch, names, cache_graph=False,
                                      **options)
    assert not op.gradient().any() and not op.matvec(torch.ones(op.size).double()).any()


def test_a_flat_vector_follows_the_models_order_whatever_the_list_order():
    model, batch = HeadFirst().double(), data()
    v = {n: torch.randn(p.shape, dtype=torch.float64, generator=gen(4))
         for n, p in model.named_parameters()}
    names = ["body.bias", "head.bias"]                 # head comes first in the model
    flat = torch.cat([v["head.bias"], v["body.bias"]])
    by_dict = fm.hessian.hvp(model, F.cross_entropy, batch, {n: v[n] for n in names},
                             params=names)
    by_flat = fm.hessian.hvp(model, F.cross_entropy, batch, flat, params=names)
    torch.testing.assert_close(by_flat, torch.cat([by_dict["head.bias"], by_dict["body.bias"]]))


def test_last_layer_of_tied_and_parametrized_heads():
    from flatminima._params import last_layer_names

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.dec = nn.Linear(4, 6)
            self.dec.weight = self.emb.weight

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.dec(torch.tanh(self.emb(t)))

    assert last_layer_names(Tied()) == ["emb.weight", "dec.bias"]
    normed = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    torch.nn.utils.parametrizations.weight_norm(normed[2])
    assert sorted(last_layer_names(normed)) == [
        "2.bias", "2.parametrizations.weight.original0", "2.parametrizations.weight.original1"]


def test_train_mode_batchnorm_through_torch_func_products():
    model, batch = mlp(), data()
    model.train()
    before = {n: b.clone() for n, b in model.named_buffers()}
    ref = fm.hessian.eigenvalues(model, F.cross_entropy, batch, train=True, generator=gen())
    fr = fm.hessian.eigenvalues(model, F.cross_entropy, batch, train=True, generator=gen(),
                                mode="forward_over_reverse")
    torch.testing.assert_close(fr, ref, rtol=1e-8, atol=0)
    fm.hessian.eigenvalues(model, F.cross_entropy, batch, train=True, curvature="ggn")
    assert model.training
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n


def test_inference_mode_and_a_bad_selection_are_value_errors():
    model, batch = mlp(), data()
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        fm.hessian.eigenvalues(model, F.cross_entropy, batch)
    with pytest.raises(ValueError, match="params must be"):
        fm.hessian.eigenvalues(model, F.cross_entropy, batch, params=3)


def test_a_buffer_changed_by_an_eval_mode_forward_is_restored():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1          # in eval mode too
            return self.lin(x)

    model, batch = Counting().double(), data()
    d = fm.landscape.random_direction(model, generator=gen())
    fm.landscape.line(model, F.cross_entropy, batch, d, [0.0, 0.5], chunk_size=1)
    fm.volume.basin_radius(model, F.cross_entropy, batch, num_directions=2, chunk_size=1,
                           generator=gen())
    assert float(model.calls) == 0
