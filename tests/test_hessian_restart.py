"""Thick-restart Lanczos against dense eigendecompositions: bounded basis, same answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import flatminima.hessian as fh
from flatminima.hessian._lanczos import LanczosBasis, lanczos
from flatminima.hessian._restart import kept_count, restarted_lanczos
from tests.test_hessian import batch, dense_hessian, gen, known_spectrum, tiny_mlp


def spectra(n: int = 200) -> dict[str, torch.Tensor]:
    g = gen(5)

    def with_bulk(head: list[float], low: float, high: float) -> torch.Tensor:
        bulk = low + (high - low) * torch.rand(n - len(head), generator=g, dtype=torch.float64)
        return torch.cat([torch.tensor(head, dtype=torch.float64), bulk])

    return {
        # one outlier over a bulk: the typical trained-network shape
        "separated": with_bulk([10.0, 3.0], 0.0, 2.0),
        # a cluster at the top: slow for any single-vector method, needs many cycles
        "clustered": with_bulk([10.0, 9.9, 9.8, 9.7, 9.6], 0.0, 9.0),
        # negative eigenvalues larger in magnitude than the positive ones
        "indefinite": with_bulk([4.0, -8.0, -6.0, 3.5], -0.5, 0.5),
    }


class MaxRows:
    """Record the largest number of rows any Lanczos basis held or allocated."""

    def __init__(self, monkeypatch) -> None:
        self.max = 0
        original = LanczosBasis.append

        def append(basis, q):
            original(basis, q)
            self.max = max(self.max, basis.rows, basis.allocated())

        monkeypatch.setattr(LanczosBasis, "append", append)


@pytest.mark.parametrize("name", ["separated", "clustered", "indefinite"])
@pytest.mark.parametrize("k,max_basis", [(1, 6), (3, 8), (5, 12), (5, 30)])
def test_restarted_finds_the_dense_eigenvalues_within_the_basis_cap(name, k, max_basis,
                                                                    monkeypatch):
    eigs = spectra()[name]
    a = known_spectrum(eigs, seed=3)
    which = "magnitude" if name == "indefinite" else "largest"
    exact = eigs[torch.argsort(eigs.abs() if which == "magnitude" else eigs, descending=True)]
    rows = MaxRows(monkeypatch)
    start = torch.randn(len(eigs), dtype=torch.float64, generator=gen(1))
    res = restarted_lanczos(lambda v: a @ v, start, 2000, max_basis, k=k, tol=1e-10,
                            which=which, generator=gen(2))
    assert res.converged
    assert rows.max <= max_basis
    key = res.ritz.abs() if which == "magnitude" else res.ritz
    got = res.ritz[torch.argsort(key, descending=True)[:k]]
    torch.testing.assert_close(got, exact[:k], rtol=1e-9, atol=0)
    # The stopping rule's guarantee: an eigenvalue within each returned residual.
    idx = torch.argsort(key, descending=True)[:k]
    for theta, r in zip(res.ritz[idx], res.residuals[idx], strict=True):
        assert float((eigs - theta).abs().min()) <= float(r) + 1e-12


def test_restart_keeps_the_basis_orthonormal_and_the_projection_exact():
    # After several cycles the held vectors are still orthonormal, and T (from the Ritz values
    # of the last cycle) is the Rayleigh quotient of A on them.
    eigs = spectra()["clustered"]
    a = known_spectrum(eigs, seed=4)
    start = torch.randn(len(eigs), dtype=torch.float64, generator=gen(3))
    res = restarted_lanczos(lambda v: a @ v, start, 60, 10, k=2, tol=1e-14, generator=gen(4))
    assert not res.converged and res.steps == 60                 # ran through several restarts
    q = res.basis.dense()
    torch.testing.assert_close(q @ q.T, torch.eye(q.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-12)
    ritz_of_projection = torch.linalg.eigvalsh(q @ a @ q.T)
    torch.testing.assert_close(ritz_of_projection, res.ritz, rtol=0, atol=1e-10)


def test_no_restart_when_the_cap_is_not_reached():
    eigs = spectra()["separated"]
    a = known_spectrum(eigs)
    start = torch.randn(len(eigs), dtype=torch.float64, generator=gen(1))
    plain = lanczos(lambda v: a @ v, start, 200, k=3, tol=1e-8, generator=gen(2))
    capped = restarted_lanczos(lambda v: a @ v, start, 200, 200, k=3, tol=1e-8,
                               generator=gen(2))
    assert capped.steps == plain.steps
    torch.testing.assert_close(capped.ritz, plain.ritz, rtol=0, atol=0)


def test_products_grow_gracefully_as_the_basis_shrinks():
    # Measured cost of the memory cap on the clustered spectrum (5 wanted): a generous cap
    # costs nothing, a cap of 12 vectors at most 3x the unrestricted products.
    eigs = spectra()["clustered"]
    a = known_spectrum(eigs, seed=6)
    start = torch.randn(len(eigs), dtype=torch.float64, generator=gen(7))
    steps = {cap: restarted_lanczos(lambda v: a @ v, start, 2000, cap, k=5, tol=1e-8,
                                    generator=gen(8)).steps for cap in (2000, 60, 12)}
    assert steps[60] <= steps[2000] * 1.2
    assert steps[12] <= steps[2000] * 3


def test_breakdown_at_low_rank_continues_in_the_complement():
    eigs = torch.cat([torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.zeros(37)])
    a = known_spectrum(eigs, seed=2)
    start = torch.randn(40, dtype=torch.float64, generator=gen(1))
    res = restarted_lanczos(lambda v: a @ v, start, 200, 5, k=3, tol=1e-10, generator=gen(2))
    assert res.converged
    torch.testing.assert_close(res.ritz.sort(descending=True).values[:3],
                               eigs[:3], rtol=1e-10, atol=1e-12)


def test_repeated_eigenvalue_copies_found_across_restarts():
    # A single start vector sees each distinct eigenvalue once; when the Krylov space closes
    # (after 4 steps here) the iteration continues in the complement, through restarts.
    eigs = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 1.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    a = known_spectrum(eigs, seed=8)
    start = torch.randn(10, dtype=torch.float64, generator=gen(1))
    res = restarted_lanczos(lambda v: a @ v, start, 200, 5, k=3, tol=1e-10, generator=gen(2))
    assert res.converged
    torch.testing.assert_close(res.ritz.sort(descending=True).values[:3],
                               eigs[:3], rtol=1e-10, atol=0)


def test_kept_count():
    assert kept_count(6, 1) == 3
    assert kept_count(20, 4) == 12
    assert kept_count(7, 5) == 6          # at least k + 1, below the cap


@pytest.mark.parametrize("max_basis", [7, 9])
def test_eigenvalues_with_a_capped_basis_match_the_dense_hessian(max_basis, monkeypatch):
    model, (x, y) = tiny_mlp(1), batch(seed=11)
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)[:3]
    rows = MaxRows(monkeypatch)
    got = fh.eigenvalues(model, F.cross_entropy, (x, y), k=3, generator=gen(1),
                         max_basis=max_basis)
    assert rows.max <= max_basis
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)


def test_default_cap_follows_the_memory_budget(monkeypatch):
    from flatminima.hessian import _eigen, _operator

    like = torch.zeros(1, dtype=torch.float32)
    monkeypatch.setattr(_operator, "memory_budget", lambda device: 1_200_000)
    assert _eigen.default_max_basis(10_000, like, 1) == 20            # 1.2 MB / (1.5 * 40 kB)
    assert _eigen.default_max_basis(1_000_000, like, 3) == 14         # floor 2k + 8
    model, (x, y) = tiny_mlp(2), batch(seed=12)
    monkeypatch.setattr(_operator, "memory_budget", lambda device: 0)  # forces restarts
    rows = MaxRows(monkeypatch)
    ref = torch.linalg.eigvalsh(dense_hessian(model, x, y)).flip(0)[:2]
    got = fh.eigenvalues(model, F.cross_entropy, (x, y), k=2, generator=gen(2), tol=1e-6)
    assert rows.max == 12
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)


def test_bad_max_basis_raises_value_error():
    model, data = tiny_mlp(), batch()
    with pytest.raises(ValueError, match="max_basis"):
        fh.eigenvalues(model, F.cross_entropy, data, k=3, max_basis=4)
    with pytest.raises(ValueError, match="max_basis"):
        fh.eigenvalues(model, F.cross_entropy, data, k=1, max_basis=2.5)
    with pytest.raises(ValueError, match="max_basis"):
        restarted_lanczos(lambda v: v, torch.ones(50), 40, 3, k=2, tol=1e-6)
