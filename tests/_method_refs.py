"""Independent references for the methods' gradients, written from each paper's objective.

Everything here goes through ``torch.func`` on a pure function of the parameters, never through the
library's plumbing (no ``functional_call`` offsets, no RNG replay, no micro-batch weighting).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad

Params = dict[str, Tensor]


def _load_example_method() -> None:
    """Register the README's worked example of a method added in one file (``gaussian_rpr``), so
    that every test parametrized over the registry covers it too."""
    path = Path(__file__).resolve().parents[1] / "examples" / "gaussian_rpr.py"
    spec = importlib.util.spec_from_file_location("examples_gaussian_rpr", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_load_example_method()


def tiny_mlp(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)


def tiny_batch(seed: int = 1, n: int = 10, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def fixed_noise(params: Params, seed: int, scale: float = 0.1) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


class ReplayNoise:
    """A ``noise=`` callable that returns a fixed list of perturbations in turn (cycling)."""

    def __init__(self, draws: list[Params]) -> None:
        self.draws, self.i = draws, 0

    def __call__(self, params, generator=None) -> Params:
        u = self.draws[self.i % len(self.draws)]
        self.i += 1
        return {n: t.clone() for n, t in u.items()}


def loss_at(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[Params], Tensor]:
    return lambda p: F.cross_entropy(functional_call(model, p, (x,)), y)


def add(a: Params, b: Params, s: float = 1.0) -> Params:
    return {n: a[n] + s * b[n] for n in a}


def params_of(model: nn.Module) -> Params:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def ref_grad(name: str, hp: dict, model: nn.Module, x: Tensor, y: Tensor, us: list[Params]):
    """The gradient each method's paper writes down, at the model's current weights."""
    w = params_of(model)
    L = loss_at(model, x, y)
    gL = grad(L)
    if name == "baseline":
        return gL(w)
    if name in ("rpr", "smoothout", "adasmoothout", "gaussian_rpr"):
        return gL(add(w, us[0]))
    if name == "nrs":
        u, alpha = us[0], hp["alpha"]

        def objective(p: Params) -> Tensor:
            z1 = functional_call(model, p, (x,))
            z2 = functional_call(model, add(p, u), (x,))
            # KL(P || Q) with P = softmax(z1): kl_div(input=log Q, target=log P).
            kl = F.kl_div(F.log_softmax(z2, -1), F.log_softmax(z1, -1), log_target=True,
                          reduction="batchmean")
            return F.cross_entropy(z1, y) + alpha * kl + F.cross_entropy(z2, y)

        return grad(objective)(w)
    if name in ("sam", "asam"):
        g = gL(w)
        if name == "sam":
            norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
            e = {n: hp["rho"] * t / norm for n, t in g.items()}
        else:
            T = {n: (w[n].abs() + hp["eta"]) if "weight" in n else torch.ones_like(w[n]) for n in w}
            norm = torch.sqrt(sum(((T[n] * g[n]) ** 2).sum() for n in g))
            e = {n: hp["rho"] * T[n] ** 2 * g[n] / norm for n in g}
        return gL(add(w, e))
    if name == "nso":
        lam, k = hp["lam"], hp["num_samples"]
        out = {n: lam * t for n, t in gL(w).items()}
        for u in us[:k]:
            gp, gm = gL(add(w, u)), gL(add(w, u, -1.0))
            out = {n: out[n] + (1 - lam) / (2 * k) * (gp[n] + gm[n]) for n in out}
        return out
    if name == "rwp":
        mix = hp["mix"]
        g0, gu = gL(w), gL(add(w, us[0]))
        return {n: mix * gu[n] + (1 - mix) * g0[n] for n in g0}
    raise KeyError(name)


# Hyperparameters used by the reference tests (non-default where a default would hide a term).
TEST_HPARAMS: dict[str, dict] = {
    "baseline": {},
    "rpr": {"rho": 0.1},
    "nrs": {"rho": 0.1, "alpha": 0.7},
    "sam": {"rho": 0.3},
    "asam": {"rho": 0.5, "eta": 0.05},
    "nso": {"sigma": 0.1, "num_samples": 3, "lam": 0.25},
    "smoothout": {"a": 0.1},
    "adasmoothout": {"a": 0.1},
    "rwp": {"gamma": 0.1, "mix": 0.6},
    "gaussian_rpr": {"sigma": 0.1},
}
NOISY = ("rpr", "nrs", "nso", "smoothout", "adasmoothout", "rwp", "gaussian_rpr")
