"""The gradient-informed Lanczos start: the operator's gradient, the start vector it makes, and
that ``start="auto"`` uses it for the top eigenvalue only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad

import flatminima.hessian as fh
from flatminima.hessian._eigen import start_vector
from flatminima.hessian._lanczos import rademacher
from flatminima.hessian._operator import CurvatureOperator
from tests.test_hessian import (
    Quadratic,
    batch,
    dense_hessian,
    known_spectrum,
    loss_of_flat,
    quadratic_loss,
    tiny_mlp,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_batch_gradient(model, x, y, names=None) -> torch.Tensor:
    loss, w0 = loss_of_flat(model, x, y, names)
    return grad(loss)(w0)


@pytest.mark.parametrize("options", [
    {},                                   # graphs kept: the gradient is read off them
    {"cache_graph": False},               # rebuilt per product: one plain gradient per batch
    {"mode": "forward_over_reverse"},
    {"curvature": "ggn"},
    {"params": "last_layer"},             # the trunk's cached inputs
])
def test_operator_gradient_is_that_of_the_size_weighted_mean_loss(options):
    model, (x, y) = tiny_mlp(3), batch(50, seed=7)
    batches = [(x[:10], y[:10]), (x[10:35], y[10:35]), (x[35:], y[35:])]
    model.eval()
    params = options.pop("params", None)
    op = CurvatureOperator(model, F.cross_entropy, batches, params, **options)
    names = ["4.weight", "4.bias"] if params == "last_layer" else None
    torch.testing.assert_close(op.gradient(), full_batch_gradient(model, x, y, names),
                               rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 0
    # Products after it are unchanged (graphs built by the gradient are the ones kept).
    v = torch.randn(op.size, dtype=torch.float64, generator=gen(1))
    h = dense_hessian(model, x, y, names)
    if options.get("curvature") != "ggn":
        torch.testing.assert_close(op.matvec(v), h @ v, rtol=1e-10, atol=1e-12)


def test_gradient_start_vector_is_rademacher_plus_half_length_gradient():
    model, (x, y) = tiny_mlp(1), batch(seed=2)
    op = CurvatureOperator(model.eval(), F.cross_entropy, (x, y))
    r = rademacher(op.size, gen(5), op.w0)
    g = full_batch_gradient(model, x, y)
    expected = r + 0.5 * r.norm() / g.norm() * g
    torch.testing.assert_close(start_vector(op, "gradient", gen(5)), expected)
    torch.testing.assert_close(start_vector(op, "random", gen(5)), r)


def test_zero_gradient_leaves_the_random_start():
    # 0.5 w^T A w at w = 0: a stationary point.
    model = Quadratic(12)
    with torch.no_grad():
        model.w.zero_()
    op = CurvatureOperator(model, quadratic_loss(known_spectrum(torch.arange(12.0).double())),
                           (torch.zeros(2, 1), torch.zeros(2)))
    start = start_vector(op, "gradient", gen(3))
    torch.testing.assert_close(start, rademacher(op.size, gen(3), op.w0))


@pytest.mark.parametrize("seed", [0, 1])
def test_gradient_start_matches_dense(seed):
    model, (x, y) = tiny_mlp(seed), batch(seed=seed + 10)
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)
    for k in (1, 4):
        got = fh.eigenvalues(model, F.cross_entropy, (x, y), k=k, start="gradient",
                             generator=gen(seed))
        torch.testing.assert_close(got, ref[:k], rtol=1e-4, atol=0)


def test_auto_start_is_the_gradient_for_the_top_eigenvalue_and_random_otherwise():
    model, (x, y) = tiny_mlp(2), batch(seed=4)

    def run(**kw):
        return fh.eigenvalues(model, F.cross_entropy, (x, y), tol=1e-3, generator=gen(7), **kw)

    # tol=1e-3 stops early enough for different start vectors to give different digits.
    assert torch.equal(run(k=1), run(k=1, start="gradient"))
    assert not torch.equal(run(k=1), run(k=1, start="random"))
    assert torch.equal(run(k=3), run(k=3, start="random"))
    assert torch.equal(run(k=1, which="magnitude"), run(k=1, which="magnitude", start="random"))


def count_products(fn) -> int:
    calls = 0
    orig = CurvatureOperator.matmat

    def counted(op, vs):
        nonlocal calls
        calls += vs.shape[0]
        return orig(op, vs)

    CurvatureOperator.matmat = counted
    try:
        fn()
    finally:
        CurvatureOperator.matmat = orig
    return calls


def test_a_gradient_along_the_top_eigenvector_saves_products():
    # 0.5 w^T A w with w near A's top eigenvector: the gradient A w points along it, as a trained
    # network's gradient points into its top eigenspace. 300 dimensions, top 10 over a bulk
    # up to 9.5: a random start needs many steps to separate them.
    n = 300
    eigs = torch.cat([torch.tensor([10.0]), torch.linspace(0.0, 9.5, n - 1)]).double()
    a = known_spectrum(eigs, seed=4)
    top = torch.linalg.eigh(a).eigenvectors[:, -1]
    model = Quadratic(n)
    with torch.no_grad():
        model.w.copy_(top + 0.01 * torch.randn(n, dtype=torch.float64, generator=gen(9)))
    data = (torch.zeros(2, 1), torch.zeros(2))
    loss = quadratic_loss(a)
    for start in ("random", "gradient"):
        got = fh.eigenvalues(model, loss, data, k=1, start=start, generator=gen(1))
        assert float(got[0]) == pytest.approx(10.0, rel=1e-4)
    randomly = count_products(
        lambda: fh.eigenvalues(model, loss, data, k=1, start="random", generator=gen(1)))
    gradient = count_products(
        lambda: fh.eigenvalues(model, loss, data, k=1, start="gradient", generator=gen(1)))
    # Measured: 19 products against 25 (the residual rule still needs the rest of the
    # spectrum resolved to 1e-4 around the top value).
    assert gradient <= 0.8 * randomly, (gradient, randomly)


def test_unknown_start_is_a_value_error():
    model, (x, y) = tiny_mlp(), batch()
    with pytest.raises(ValueError, match="unknown start"):
        fh.eigenvalues(model, F.cross_entropy, (x, y), start="ones")


def test_measurements_inside_no_grad_equal_those_outside():
    # A caller's evaluation loop often runs under torch.no_grad(); the graphs are built anyway.
    model, (x, y) = tiny_mlp(5), batch(seed=6)
    data = [(x[:15], y[:15]), (x[15:], y[15:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)

    def measure():
        return (fh.eigenvalues(model, F.cross_entropy, data, k=2, generator=gen()),
                fh.eigenvalues(model, F.cross_entropy, data, k=1, generator=gen()),
                torch.tensor(float(fh.trace(model, F.cross_entropy, data, 30, generator=gen()))),
                fh.hvp(model, F.cross_entropy, data, v))

    outside = measure()
    with torch.no_grad():
        inside = measure()
    for a, b in zip(outside, inside, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
