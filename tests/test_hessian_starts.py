"""Skipped eigenvalues: the Ritz values are lower bounds, and several starts merge soundly."""

from __future__ import annotations

import pytest
import torch

import flatminima.hessian as fh
from flatminima.hessian._eigen import merge_runs
from tests.test_hessian import Quadratic, known_spectrum, quadratic_loss

# A tight pair (9.0, 8.99) above a gap, over a bulk: single-vector Lanczos sometimes converges
# on 8.5 for the fifth value before the start vector's small 8.99 component has grown.
N = 300
EIGS = torch.cat([torch.tensor([10.0, 9.5, 9.2, 9.0, 8.99, 8.5]),
                  torch.linspace(0.0, 8.0, N - 6)]).double()
F64 = torch.float64
TOP5 = torch.sort(EIGS, descending=True).values[:5]


def cluster_problem():
    torch.manual_seed(0)
    return Quadratic(N), quadratic_loss(known_spectrum(EIGS)), (torch.zeros(2, 1), torch.zeros(2))


def top5(seed: int, starts: int = 1) -> torch.Tensor:
    model, loss, data = cluster_problem()
    return fh.eigenvalues(model, loss, data, k=5, tol=1e-3, starts=starts,
                          generator=torch.Generator().manual_seed(seed))


def test_every_value_is_a_lower_bound_within_tol_of_an_eigenvalue():
    misses = 0
    for seed in range(20):
        got = top5(seed)
        # Cauchy interlacing: the i-th largest Ritz value never exceeds the i-th eigenvalue.
        assert bool((got <= TOP5 + 1e-9).all()), (seed, got)
        # The residual rule: each value within relative tol of some eigenvalue.
        nearest = (got[:, None] - EIGS[None, :]).abs().min(1).values
        assert bool((nearest <= 1e-3 * got.abs()).all()), (seed, got)
        misses += float((TOP5 - got).max()) > 0.1
    # The limitation documented in eigenvalues(): some starts skip 8.99 (here 2 of these 20).
    assert 0 < misses < 10


def test_a_second_start_recovers_the_skipped_eigenvalue():
    one = top5(16)
    assert float(one[4]) == pytest.approx(8.5, rel=1e-3)        # 8.99 skipped
    two = top5(16, starts=2)
    assert torch.allclose(two, TOP5, rtol=1e-3)
    # The first of the two starts is the single run's: the merge can only raise each value.
    assert bool((two >= one - 1e-12).all())


def test_merge_largest_is_the_positionwise_maximum():
    runs = [torch.tensor([9.0, 10.0, 8.5], dtype=F64), torch.tensor([8.99, 9.0, 10.0], dtype=F64)]
    assert merge_runs(runs, 3, "largest").tolist() == [10.0, 9.0, 8.99]


def test_merge_magnitude_keeps_each_end_a_bound():
    # Run A saw 10, 9 and -9.5; run B saw 10, -9.6 and -9.4. Position by position: positives
    # (10, 9), negatives (-9.6, -9.4); the three largest in magnitude, largest first.
    runs = [torch.tensor([10.0, 9.0, -9.5], dtype=F64), torch.tensor([-9.6, 10.0, -9.4], dtype=F64)]
    assert merge_runs(runs, 3, "magnitude").tolist() == [10.0, -9.4, -9.6]
    assert merge_runs(runs[:1], 3, "magnitude").tolist() == [10.0, 9.0, -9.5]


def test_starts_must_be_a_positive_integer():
    model, loss, data = cluster_problem()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="starts"):
            fh.eigenvalues(model, loss, data, k=1, starts=bad)
