"""Exactly repeated eigenvalues when products carry rounding noise: the Krylov space then closes
only to within that noise, and the copies must still be looked for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import flatminima.hessian as fh
from flatminima.hessian._lanczos import lanczos
from flatminima.hessian._restart import restarted_lanczos
from tests.test_hessian import known_spectrum

EIGS = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5],
                    dtype=torch.float64)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def noisy(a: torch.Tensor, level: float, seed: int = 7):
    """Products with relative noise ``level``: far above the rounding floor of float64."""
    g = gen(seed)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        hv = a @ v
        return hv + level * hv.norm() * torch.randn(hv.shape, generator=g, dtype=hv.dtype)

    return matvec


@pytest.mark.parametrize("max_basis", [None, 8])
def test_three_copies_found_with_noisy_products(max_basis):
    a = known_spectrum(EIGS, seed=3)
    start = torch.randn(12, dtype=torch.float64, generator=gen(1))
    if max_basis is None:
        res = lanczos(noisy(a, 1e-12), start, 100, k=3, tol=1e-6, generator=gen(2))
    else:
        res = restarted_lanczos(noisy(a, 1e-12), start, 100, max_basis, k=3, tol=1e-6,
                                generator=gen(2))
    assert res.converged
    torch.testing.assert_close(res.ritz.sort(descending=True).values[:3], EIGS[:3],
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("k", [2, 4])
def test_the_top_k_of_triple_eigenvalues(k):
    a = known_spectrum(EIGS, seed=3)
    start = torch.randn(12, dtype=torch.float64, generator=gen(1))
    res = lanczos(noisy(a, 1e-12), start, 100, k=k, tol=1e-6, generator=gen(2))
    assert res.converged
    torch.testing.assert_close(res.ritz.sort(descending=True).values[:k], EIGS[:k],
                               rtol=1e-6, atol=0)


def test_last_layer_under_mean_squared_error_has_every_copy():
    # A linear last layer under MSE: H = A (x) I_3 exactly, every eigenvalue three times.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x = torch.randn(11, 4, dtype=torch.float64)
    t = torch.randn(11, 3, dtype=torch.float64)
    names = ["2.weight", "2.bias"]
    ref = torch.linalg.eigvalsh(mse_last_layer_hessian(model, x, t, names)).flip(0)[:4]
    assert float(ref[2] - ref[3]) > 0.1          # three copies, then a gap
    got = fh.eigenvalues(model, F.mse_loss, (x, t), k=3, params="last_layer", generator=gen())
    torch.testing.assert_close(got, ref[:3], rtol=1e-6, atol=0)


def mse_last_layer_hessian(model, x, t, names):
    from torch.func import functional_call, hessian

    from flatminima._params import FlatParams

    params = {n: p.detach() for n, p in model.named_parameters()}
    flat = FlatParams.of({n: params[n] for n in names})
    fixed = {n: p for n, p in params.items() if n not in names}

    def loss(w):
        return F.mse_loss(functional_call(model, {**fixed, **flat.unflatten(w)}, (x,)), t)

    return hessian(loss)(flat.flatten(params))
