"""fm.hessian against exact answers: quadratics with a known spectrum, dense torch.func Hessians."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import flatminima.hessian as fh
from flatminima._params import FlatParams


class Quadratic(nn.Module):
    """``loss = 0.5 w^T A w`` through the ``(outputs, targets)`` interface: outputs are ``w``."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.expand(len(x), -1)


def quadratic_loss(a: torch.Tensor):
    def loss(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.einsum("bi,ij,bj->b", out, a, out).mean()

    return loss


def known_spectrum(eigs: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(eigs) @ q.T


def tiny_mlp(seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 3)]
    model = nn.Sequential(*layers).double()
    if bn:  # non-trivial running statistics so eval mode differs from train mode
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def batch(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                             generator=g)


def loss_of_flat(model: nn.Module, x, y, names=None, loss_fn=F.cross_entropy):
    """``(w -> loss, w0)``: the full-batch loss as a function of the named parameters' flat
    vector (in the order given), every other parameter fixed."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else names
    flat = FlatParams.of({n: params[n] for n in names})
    fixed = {n: p for n, p in params.items() if n not in names}

    def loss(w):
        return loss_fn(functional_call(model, {**fixed, **flat.unflatten(w)}, (x,)), y)

    return loss, flat.flatten(params)


def dense_hessian(model: nn.Module, x, y, names=None) -> torch.Tensor:
    """Reference: torch.func.hessian of the full-batch loss over the named parameters."""
    loss, w0 = loss_of_flat(model, x, y, names)
    return hessian(loss)(w0)


def dense_ggn(model: nn.Module, x, y, loss_fn=F.cross_entropy) -> torch.Tensor:
    """Reference Gauss-Newton matrix ``J^T H_out J`` over all parameters, from torch.func."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = FlatParams.of(params)
    w0 = flat.flatten(params)
    out = functional_call(model, params, (x,))
    j = jacrev(lambda w: functional_call(model, flat.unflatten(w), (x,)))(w0)
    j = j.reshape(-1, w0.numel())
    h_out = hessian(lambda o: loss_fn(o.reshape(out.shape), y))(out.reshape(-1))
    return j.T @ h_out @ j


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- hvp ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_hvp_matches_dense(mode):
    model, (x, y) = tiny_mlp(), batch()
    h = dense_hessian(model, x, y)
    v = torch.randn(h.shape[0], dtype=torch.float64, generator=gen(3))
    hv = fh.hvp(model, F.cross_entropy, (x, y), v, mode=mode)
    torch.testing.assert_close(hv, h @ v, rtol=1e-10, atol=1e-12)


def test_hvp_dict_roundtrip_and_block_equals_single():
    model, data = tiny_mlp(), batch()
    params = dict(model.named_parameters())
    v = {n: torch.randn_like(p) for n, p in params.items()}
    hv = fh.hvp(model, F.cross_entropy, data, v)
    assert set(hv) == set(params) and all(hv[n].shape == p.shape for n, p in params.items())
    op = fh.CurvatureOperator(model.eval(), F.cross_entropy, data)
    vs = torch.randn(4, op.size, dtype=torch.float64, generator=gen(1))
    block = op.matmat(vs)
    single = torch.stack([op.matvec(v) for v in vs])
    torch.testing.assert_close(block, single, rtol=1e-10, atol=1e-12)
    assert op.num_matvecs == 8


# --- eigenvalues ------------------------------------------------------------------------------
def test_eigenvalues_quadratic_known_spectrum():
    eigs = torch.tensor([10.0, 7.0, 5.0, 3.0, 2.5, -1.0, -4.0] + [0.1 * i for i in range(13)],
                        dtype=torch.float64)
    a = known_spectrum(eigs)
    model = Quadratic(len(eigs))
    data = (torch.zeros(4, 1), torch.zeros(4))
    top = fh.eigenvalues(model, quadratic_loss(a), data, k=4, generator=gen())
    torch.testing.assert_close(top, torch.tensor([10.0, 7.0, 5.0, 3.0], dtype=torch.float64),
                               rtol=1e-8, atol=0)
    # "magnitude" picks the -4 before the 3.
    mag = fh.eigenvalues(model, quadratic_loss(a), data, k=4, which="magnitude", generator=gen())
    torch.testing.assert_close(mag, torch.tensor([10.0, 7.0, 5.0, -4.0], dtype=torch.float64))


def test_eigenvalues_repeated_eigenvalue_found_after_restart():
    # Lanczos from one vector sees each distinct eigenvalue once; the Krylov space closes after
    # 3 steps and the restart in the orthogonal complement finds the second copy.
    eigs = torch.tensor([5.0, 5.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    model = Quadratic(6)
    data = (torch.zeros(2, 1), torch.zeros(2))
    top = fh.eigenvalues(model, quadratic_loss(known_spectrum(eigs)), data, k=3, generator=gen())
    torch.testing.assert_close(top, torch.tensor([5.0, 5.0, 2.0], dtype=torch.float64))


def test_eigenvalues_third_copy_not_missed_while_the_complement_is_explored():
    # After the first block closes (4 distinct eigenvalues) the old Ritz values are exact; the
    # iteration must not stop before the block opened in the complement has found its own
    # largest eigenvalue (the second 5), nor before the one after it finds the third.
    eigs = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    model = Quadratic(10)
    data = (torch.zeros(2, 1), torch.zeros(2))
    loss = quadratic_loss(known_spectrum(eigs, seed=8))
    for seed in range(3):
        top = fh.eigenvalues(model, loss, data, k=3, generator=gen(seed))
        torch.testing.assert_close(top, eigs[:3])


def test_low_rank_operator_stops_once_the_complement_adds_nothing():
    # Rank 3 in 300 dimensions: after the range is found every fresh vector lies in the null
    # space and closes at once; one such block that changes nothing ends the iteration.
    eigs = torch.cat([torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.zeros(297)])
    from flatminima.hessian._lanczos import lanczos

    a = known_spectrum(eigs, seed=2)
    start = torch.randn(300, dtype=torch.float64, generator=gen(1))
    res = lanczos(lambda v: a @ v, start, 300, k=3, tol=1e-8, generator=gen(2))
    assert res.converged and res.steps <= 6
    torch.testing.assert_close(res.ritz.sort(descending=True).values[:3], eigs[:3])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["double_backward", "forward_over_reverse"])
def test_eigenvalues_tiny_mlp_match_dense(seed, mode):
    model, (x, y) = tiny_mlp(seed), batch(seed=seed + 10)
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)[:5]
    got = fh.eigenvalues(model, F.cross_entropy, (x, y), k=5, generator=gen(seed), mode=mode)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)


def test_eigenvalues_float32_model_within_1e4():
    model, (x, y) = tiny_mlp(2), batch(seed=5)
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)[:3]
    got = fh.eigenvalues(model.float(), F.cross_entropy, (x.float(), y), k=3, generator=gen())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=0)


def test_multi_batch_equals_full_batch():
    model, (x, y) = tiny_mlp(3), batch(50, seed=7)
    # Unequal sizes: a plain mean of per-batch losses would weight the last batch too much.
    batches = [(x[:10], y[:10]), (x[10:35], y[10:35]), (x[35:], y[35:])]
    full = fh.eigenvalues(model, F.cross_entropy, (x, y), k=3, generator=gen())
    multi = fh.eigenvalues(model, F.cross_entropy, batches, k=3, generator=gen())
    from_gen = fh.eigenvalues(model, F.cross_entropy, (b for b in batches), k=3, generator=gen())
    torch.testing.assert_close(multi, full, rtol=1e-8, atol=0)
    torch.testing.assert_close(from_gen, full, rtol=1e-8, atol=0)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    h = dense_hessian(model, x, y)
    for mode in ("double_backward", "forward_over_reverse"):
        hv = fh.hvp(model, F.cross_entropy, batches, v, mode=mode)
        torch.testing.assert_close(hv, h @ v, rtol=1e-10, atol=1e-12)
    t_full = fh.trace(model, F.cross_entropy, (x, y), 60, generator=gen(4))
    t_multi = fh.trace(model, F.cross_entropy, batches, 60, generator=gen(4))
    assert float(t_multi) == pytest.approx(float(t_full), rel=1e-9)


def test_last_layer_and_subsets():
    model, (x, y) = tiny_mlp(4), batch(seed=8)
    names = ["4.weight", "4.bias"]
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y, names)).flip(0)[:2]
    for sel in ("last_layer", names, lambda n: n.startswith("4."), lambda n, p: n[0] == "4"):
        got = fh.eigenvalues(model, F.cross_entropy, (x, y), k=2, params=sel, generator=gen())
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    weights = [n for n, p in model.named_parameters() if p.dim() > 1]
    ref_w = torch.linalg.eigvalsh(dense_hessian(model, x, y, weights)).flip(0)[:2]
    got_w = fh.eigenvalues(model, F.cross_entropy, (x, y), k=2, params="weights", generator=gen())
    torch.testing.assert_close(got_w, ref_w, rtol=1e-6, atol=0)


def test_last_layer_found_in_execution_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)   # registered first, runs last
            self.body = nn.Linear(3, 4)

        def forward(self, x):
            return self.head(torch.tanh(self.body(x)))

    from flatminima._params import select_params

    sel = select_params(HeadFirst(), "last_layer", example_input=torch.randn(2, 3))
    assert list(sel) == ["head.weight", "head.bias"]


def test_ggn_matches_dense_and_equals_hessian_on_last_layer():
    model, (x, y) = tiny_mlp(5), batch(seed=9)
    ref = torch.linalg.eigvalsh(dense_ggn(model, x, y)).flip(0)[:3]
    got = fh.eigenvalues(model, F.cross_entropy, (x, y), k=3, curvature="ggn", generator=gen())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)
    hess_ll = fh.eigenvalues(model, F.cross_entropy, (x, y), k=3, params="last_layer",
                             generator=gen())
    ggn_ll = fh.eigenvalues(model, F.cross_entropy, (x, y), k=3, params="last_layer",
                            curvature="ggn", generator=gen())
    torch.testing.assert_close(ggn_ll, hess_ll, rtol=1e-6, atol=0)


def test_eval_mode_by_default_and_model_untouched():
    model, (x, y) = tiny_mlp(6, bn=True), batch(seed=11)
    model.train()
    before = {n: b.clone() for n, b in model.state_dict().items()}
    eval_ref = torch.linalg.eigvalsh(dense_hessian(model.eval(), x, y)).flip(0)[0]
    model.train()
    got = fh.eigenvalues(model, F.cross_entropy, (x, y), generator=gen())
    torch.testing.assert_close(got[0], eval_ref, rtol=1e-4, atol=0)
    fh.eigenvalues(model, F.cross_entropy, (x, y), generator=gen(), train=True)
    assert model.training
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n


# --- trace -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method,factor", [("hutch++", 3), ("krylov", 2)])
def test_trace_exact_when_budget_covers_dimension(method, factor):
    model, (x, y) = tiny_mlp(7), batch(seed=12)
    h = dense_hessian(model, x, y)
    t = fh.trace(model, F.cross_entropy, (x, y), num_matvecs=factor * h.shape[0], method=method,
                 generator=gen())
    assert float(t) == pytest.approx(float(h.trace()), rel=1e-9)
    assert t.std_error == 0.0


def test_krylov_trace_exact_on_low_rank_hessian():
    # Rank 3: the Krylov space closes after 3 steps, restarts see a zero remainder, and the
    # probes of the remainder all return 0, so 20 products give the exact trace.
    eigs = torch.zeros(40, dtype=torch.float64)
    eigs[:3] = torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)
    model, loss = Quadratic(40), quadratic_loss(known_spectrum(eigs, seed=5))
    data = (torch.zeros(2, 1), torch.zeros(2))
    t = fh.trace(model, loss, data, 20, generator=gen(1))
    assert t.method == "krylov" and t.num_matvecs == 20
    assert float(t) == pytest.approx(3.5, abs=1e-10)
    assert t.std_error < 1e-10


@pytest.mark.parametrize("method", ["krylov", "hutch++", "hutchinson"])
def test_trace_within_stated_error(method):
    model, (x, y) = tiny_mlp(8), batch(seed=13)
    exact = float(dense_hessian(model, x, y).trace())
    z_scores = []
    for seed in range(6):
        t = fh.trace(model, F.cross_entropy, (x, y), 30, method=method, generator=gen(seed))
        assert t.num_matvecs == 30 and t.method == method
        z_scores.append((float(t) - exact) / t.std_error)
    # Each estimate within 4 of its stated standard errors, and the errors are not all one-sided
    # by a lot: the stated error is an honest scale of the deviation.
    assert max(abs(z) for z in z_scores) < 4.0
    assert abs(sum(z_scores) / math.sqrt(len(z_scores))) < 4.0


def test_deflated_estimators_beat_hutchinson_on_decaying_spectrum():
    eigs = torch.tensor([100.0 / (i + 1) ** 2 for i in range(60)], dtype=torch.float64)
    model = Quadratic(60)
    loss = quadratic_loss(known_spectrum(eigs, seed=3))
    data = (torch.zeros(2, 1), torch.zeros(2))
    # Root-mean-square relative error over 60 seeds: fewer seeds leave the comparison between
    # the two deflated estimators to chance (their errors are within 2x of each other).
    sq = {"krylov": 0.0, "hutch++": 0.0, "hutchinson": 0.0}
    for seed in range(60):
        for method in sq:
            t = fh.trace(model, loss, data, 30, method=method, generator=gen(seed))
            sq[method] += (float(t) - float(eigs.sum())) ** 2
    assert sq["hutch++"] < 0.5**2 * sq["hutchinson"]
    assert sq["krylov"] < 0.75**2 * sq["hutch++"]


@pytest.mark.parametrize("method", ["krylov", "hutch++"])
def test_trace_basis_cap_keeps_the_estimate_exact_on_low_rank_and_unbiased(method, monkeypatch):
    # A cap of 4 directions still deflates a rank-3 Hessian completely (Lanczos needs the start
    # vector and three products of it).
    eigs = torch.zeros(40, dtype=torch.float64)
    eigs[:3] = torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)
    model, loss = Quadratic(40), quadratic_loss(known_spectrum(eigs, seed=5))
    data = (torch.zeros(2, 1), torch.zeros(2))
    t = fh.trace(model, loss, data, 30, method=method, generator=gen(1), max_basis=4)
    assert t.basis_size == 4 and t.num_matvecs == 30
    assert float(t) == pytest.approx(3.5, abs=1e-9)
    # On a full-rank spectrum a capped basis leaves more to the probes: still unbiased (mean of
    # 120 seeds within 4 standard errors) with an error between uncapped and Hutchinson's.
    eigs = torch.tensor([30.0 / (i + 1) ** 2 for i in range(40)], dtype=torch.float64)
    loss = quadratic_loss(known_spectrum(eigs, seed=6))
    runs = {cap: torch.tensor([float(fh.trace(model, loss, data, 30, method=method,
                                              generator=gen(s), max_basis=cap))
                               for s in range(120)], dtype=torch.float64) - float(eigs.sum())
            for cap in (None, 2, 0)}
    assert abs(float(runs[2].mean())) < 4 * float(runs[2].std()) / math.sqrt(120)
    rms = {cap: float(r.pow(2).mean().sqrt()) for cap, r in runs.items()}
    assert rms[None] < rms[2] < rms[0]
    # max_basis=0 is Hutchinson, named as such; the default follows the memory budget.
    assert fh.trace(model, loss, data, 30, method=method, max_basis=0).method == "hutchinson"
    from flatminima.hessian import _operator

    monkeypatch.setattr(_operator, "memory_budget", lambda device: 40 * 8 * 5)  # 5 vectors
    t = fh.trace(model, loss, data, 30, method=method, generator=gen(2))
    assert t.basis_size == (5 if method == "krylov" else 2)


# --- density ---------------------------------------------------------------------------------
def test_slq_quadrature_reproduces_moments():
    eigs = torch.linspace(-1.0, 4.0, 25, dtype=torch.float64)
    a = known_spectrum(eigs, seed=5)
    model = Quadratic(25)
    data = (torch.zeros(2, 1), torch.zeros(2))
    nodes, weights = fh.density_nodes(model, quadratic_loss(a), data, num_steps=6, num_runs=1,
                                      generator=gen(2))
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, dtype=torch.float64))
    # Gauss quadrature with 6 nodes is exact for degree < 12: v^T A^p v / ||v||^2.
    from flatminima.hessian._lanczos import rademacher

    v = rademacher(25, gen(2), torch.zeros(1, dtype=torch.float64))
    v = v / v.norm()
    for p in range(0, 12):
        exact = v @ torch.linalg.matrix_power(a, p) @ v
        quad = (weights[0] * nodes[0] ** p).sum()
        torch.testing.assert_close(quad, exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_slq_without_reorthogonalization_keeps_the_quadrature(dtype, monkeypatch):
    # Outliers over a bulk: their Ritz values converge within a few steps, orthogonality is
    # lost and copies of them appear, yet the quadrature moments stay those of v^T A^p v.
    from flatminima.hessian._lanczos import LanczosBasis, rademacher

    n, g = 300, gen(4)
    eigs = torch.cat([torch.tensor([50.0, 20.0, 10.0], dtype=torch.float64),
                      0.5 * torch.randn(n - 3, generator=g, dtype=torch.float64)])
    a = known_spectrum(eigs, seed=7)
    model = Quadratic(n).to(dtype)
    loss = quadratic_loss(a.to(dtype))
    data = (torch.zeros(2, 1), torch.zeros(2))
    appended = []
    original = LanczosBasis.append
    monkeypatch.setattr(LanczosBasis, "append", lambda b, q: (appended.append(1), original(b, q)))
    nodes, weights = fh.density_nodes(model, loss, data, num_steps=60, generator=gen(2),
                                      reorthogonalize=False)
    assert not appended                                       # no basis was kept
    assert int((nodes[0] > 49.9).sum()) >= 2                  # the ghosts are there ...
    v = rademacher(n, gen(2), torch.zeros(1, dtype=dtype)).double()
    v = v / v.norm()
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for p in range(0, 10):                                    # ... and harmless
        exact = v @ torch.linalg.matrix_power(a, p) @ v
        torch.testing.assert_close((weights[0] * nodes[0] ** p).sum(), exact, rtol=rtol, atol=0)
    # The copies share the weight of the eigenvalue 50: together they carry (v^T u_1)^2.
    u1 = torch.linalg.eigh(a).eigenvectors[:, -1]
    mass = float(weights[0][nodes[0] > 49.9].sum())
    assert mass == pytest.approx(float(v @ u1) ** 2, rel=1e-3)
    # The default keeps the basis when it fits the memory budget, and drops it when not.
    from flatminima.hessian import _operator

    appended.clear()
    fh.density_nodes(model, loss, data, num_steps=20, generator=gen(2))
    assert appended
    appended.clear()
    monkeypatch.setattr(_operator, "memory_budget", lambda device: 10 * n * 4)
    fh.density_nodes(model, loss, data, num_steps=20, generator=gen(2))
    assert not appended


def test_density_integrates_to_one_and_peaks_at_eigenvalues():
    eigs = torch.tensor([0.0] * 10 + [1.0] * 5 + [6.0] * 5, dtype=torch.float64)
    model = Quadratic(20)
    data = (torch.zeros(2, 1), torch.zeros(2))
    grid, dens = fh.density(model, quadratic_loss(known_spectrum(eigs, seed=6)), data,
                            num_steps=10, num_runs=8, sigma=0.1, generator=gen())
    assert float(torch.trapezoid(dens, grid)) == pytest.approx(1.0, abs=1e-6)
    mass = [float(torch.trapezoid(dens * ((grid - c).abs() < 0.5), grid)) for c in (0, 1, 6)]
    assert mass == pytest.approx([0.5, 0.25, 0.25], abs=0.15)


# --- bad input -------------------------------------------------------------------------------
def test_bad_inputs_raise_value_error():
    model, data = tiny_mlp(), batch()
    n = sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match=f"k={n + 1}"):
        fh.eigenvalues(model, F.cross_entropy, data, k=n + 1)
    with pytest.raises(ValueError, match="k must be"):
        fh.eigenvalues(model, F.cross_entropy, data, k=0)
    with pytest.raises(ValueError, match="max_iter"):
        fh.eigenvalues(model, F.cross_entropy, data, max_iter=True)
    with pytest.raises(ValueError, match="empty"):
        fh.eigenvalues(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="empty"):
        fh.trace(model, F.cross_entropy, (data[0][:0], data[1][:0]))
    with pytest.raises(ValueError, match="'head.weight'"):
        fh.eigenvalues(model, F.cross_entropy, data, params=["head.weight"])
    with pytest.raises(ValueError, match="matches no"):
        fh.trace(model, F.cross_entropy, data, params=lambda n: False)
    with pytest.raises(ValueError, match="'simpson'"):
        fh.trace(model, F.cross_entropy, data, method="simpson")
    with pytest.raises(ValueError, match="'ggn2'"):
        fh.eigenvalues(model, F.cross_entropy, data, curvature="ggn2")
    with pytest.raises(ValueError, match="num_matvecs"):
        fh.trace(model, F.cross_entropy, data, num_matvecs=0)
    with pytest.raises(ValueError, match="num_matvecs"):
        fh.trace(model, F.cross_entropy, data, num_matvecs=True, method="hutchinson")
    with pytest.raises(ValueError, match="block"):
        fh.trace(model, F.cross_entropy, data, block=True)
    with pytest.raises(ValueError, match="num_runs"):
        fh.density_nodes(model, F.cross_entropy, data, num_steps=3, num_runs=True)
    with pytest.raises(ValueError, match="does not match"):
        fh.hvp(model, F.cross_entropy, data, torch.zeros(3, dtype=torch.float64))


def test_lanczos_basis_blocks_equal_a_dense_basis():
    from flatminima.hessian._lanczos import LanczosBasis

    rows = torch.randn(150, 30, dtype=torch.float64, generator=gen(2))
    basis = LanczosBasis(rows[0])
    for i in range(1, 150):
        basis.append(rows[i])
        assert basis.rows == i + 1
        allocated = sum(b.shape[0] for b in basis._blocks)
        assert allocated - basis.rows <= max(8, basis.rows)     # unused rows stay bounded
    torch.testing.assert_close(basis.dense(), rows, rtol=0, atol=0)
    for i in (0, 7, 8, 63, 149, -1, -2):
        torch.testing.assert_close(basis.row(i), rows[i], rtol=0, atol=0)
    w, ws = rows[3] + 1.0, rows[:4] * 2.0 - 1.0
    torch.testing.assert_close(basis.project_out(w), w - rows.T @ (rows @ w))
    torch.testing.assert_close(basis.project_out(ws), ws - (ws @ rows.T) @ rows)
