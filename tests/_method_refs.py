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
    if name in MORE_REFS:
        return MORE_REFS[name](hp, model, x, y, us)
    raise KeyError(name)


# ----------------------------------------------------------------------------- MSAM, ESAM,
# VaSSO, Fisher SAM (and the helpers their multi-step tests use)

def _norm(d: Params) -> Tensor:
    return torch.sqrt(sum((t**2).sum() for t in d.values()))


def stub_momentum(w: Tensor) -> Tensor:
    """The momentum :class:`MomentumStub` reports for a parameter with values ``w``."""
    return torch.cos(3 * w) + 0.5


class MomentumStub:
    """An optimizer-shaped stand-in for MSAM in the registry-wide tests: its state gives every
    parameter the momentum buffer ``cos(3w) + 0.5``, a fixed function of the parameter's values,
    so that any model, a DDP copy of it and the reference agree without a real optimizer."""

    param_groups: list = []

    class _State:
        def get(self, p, default=None):
            return {"momentum_buffer": stub_momentum(p.detach())}

    state = _State()


def msam_ref(hp, model, x, y, momentum: Params | None = None) -> Params:
    """``grad L(w - rho v/||v||)``; ``v`` the stub's buffers unless given (None entries: no
    buffer yet; all None: ``grad L(w)``)."""
    w = params_of(model)
    v = {n: stub_momentum(t) for n, t in w.items()} if momentum is None else momentum
    v = {n: t for n, t in v.items() if t is not None}
    gL = grad(loss_at(model, x, y))
    if not v:
        return gL(w)
    nv = _norm(v)
    return gL({n: w[n] - hp["rho"] * v[n] / nv if n in v else w[n] for n in w})


def esam_ref(hp, model, x, y, kept: list[str] | None = None) -> Params:
    """ESAM: ascent over the kept tensors scaled by 1/beta, then the top-gamma examples by
    per-example loss increase, their mean loss differentiated at ``w + e``."""
    w = params_of(model)
    g = grad(loss_at(model, x, y))(w)
    kept = list(w) if kept is None else kept
    gk = {n: g[n] for n in kept}
    scale = hp["rho"] / hp.get("beta", 1.0) / _norm(gk)
    e = {n: (gk[n] * scale if n in gk else torch.zeros_like(w[n])) for n in w}
    pe = add(w, e)
    gamma = hp.get("gamma", 1.0)
    if gamma < 1:
        with torch.no_grad():
            before = F.cross_entropy(functional_call(model, w, (x,)), y, reduction="none")
            after = F.cross_entropy(functional_call(model, pe, (x,)), y, reduction="none")
        k = max(1, int(len(y) * gamma))
        top = torch.topk(after - before, k).indices
        x, y = x[top], y[top]
    return grad(loss_at(model, x, y))(pe)


def vasso_ref_sequence(hp, model, batches, d: Params | None = None):
    """VaSSO over several calls at fixed weights: ``d = g`` first, then ``(1-theta) d +
    theta g``; returns the gradient of each call and the final ``d``."""
    w = params_of(model)
    out = []
    for x, y in batches:
        gL = grad(loss_at(model, x, y))
        g = gL(w)
        d = g if d is None else {n: (1 - hp["theta"]) * d[n] + hp["theta"] * g[n] for n in g}
        nd = _norm(d)
        out.append(gL({n: w[n] + hp["rho"] * d[n] / nd for n in w}))
    return out, d


def fisher_sam_ref(hp, model, x, y) -> Params:
    w = params_of(model)
    gL = grad(loss_at(model, x, y))
    g = gL(w)
    u = {n: t / (1 + hp["eta"] * t**2) for n, t in g.items()}
    quad = torch.sqrt(sum((g[n] * u[n]).sum() for n in g))
    return gL({n: w[n] + hp["rho"] * u[n] / quad for n in w})


def gam_ref(hp, model, x, y) -> Params:
    """First-order GAM (official gam.py): four gradients, then h minus gamma times the part of
    m = g0 + (1 - beta) g2 orthogonal to h = alpha g1 + (1 - alpha) g3."""
    w = params_of(model)
    gL = grad(loss_at(model, x, y))

    def unit(d):
        nd = _norm(d)
        return {n: t / nd for n, t in d.items()}

    g0 = gL(w)
    g1 = gL(add(w, unit(g0), hp["rho_prime"]))
    e = {n: hp["rho"] * t for n, t in unit({n: g1[n] - g0[n] for n in w}).items()}
    g2 = gL(add(w, e))
    g3 = gL(add(add(w, e), unit(g2), hp["rho_prime"]))
    m = {n: g0[n] + (1 - hp["beta"]) * g2[n] for n in w}
    h = {n: hp["alpha"] * g1[n] + (1 - hp["alpha"]) * g3[n] for n in w}
    c = sum((m[n] * h[n]).sum() for n in w) / _norm(h) ** 2
    return {n: h[n] - hp["gamma"] * (m[n] - c * h[n]) for n in w}


MORE_REFS: dict[str, Callable] = {
    "gam": lambda hp, model, x, y, us: gam_ref(hp, model, x, y),
    "msam": lambda hp, model, x, y, us: msam_ref(hp, model, x, y),
    "esam": lambda hp, model, x, y, us: esam_ref(hp, model, x, y),
    "vasso": lambda hp, model, x, y, us: vasso_ref_sequence(hp, model, [(x, y)])[0][0],
    "fisher_sam": lambda hp, model, x, y, us: fisher_sam_ref(hp, model, x, y),
}



# ----------------------------------------------------------------------------- GSAM, WSAM,
# GCSAM, FriendlySAM and m-sharpness (and the helpers of their own tests)

def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[n] * b[n]).sum() for n in a)


def sam_ascent(g: Params, rho: float) -> Params:
    norm = torch.sqrt(_dot(g, g))
    return {n: rho * t / norm for n, t in g.items()}


def gsam_ref(hp, model, x, y) -> Params:
    """``g_p - alpha * (g - <g, g_p>/||g_p||^2 g_p)``, ``g_p = grad L(w + rho g/||g||)``."""
    w = params_of(model)
    gL = grad(loss_at(model, x, y))
    g = gL(w)
    gp = gL(add(w, sam_ascent(g, hp["rho"])))
    c = _dot(g, gp) / _dot(gp, gp)
    return {n: gp[n] - hp["alpha"] * (g[n] - c * gp[n]) for n in g}


def wsam_ref(hp, model, x, y) -> Params:
    """The gradient of ``L(w) + k (L(w + e) - L(w))``, ``k = gamma/(1-gamma)``, ``e`` fixed."""
    w = params_of(model)
    L = loss_at(model, x, y)
    e = sam_ascent(grad(L)(w), hp["rho"])
    k = hp["gamma"] / (1 - hp["gamma"])
    return grad(lambda p: L(p) + k * (L(add(p, e)) - L(p)))(w)


def centralized(t: Tensor) -> Tensor:
    """Each row (output unit, filter) of a tensor with more than one dimension minus its mean."""
    if t.dim() < 2:
        return t
    rows = t.reshape(t.shape[0], -1)
    return (rows - rows.sum(1, keepdim=True) / rows.shape[1]).reshape(t.shape)


def gcsam_ref(hp, model, x, y) -> Params:
    """``grad L(w + rho GC(g)/||g||)`` (the norm of the raw gradient, as the official code)."""
    w = params_of(model)
    gL = grad(loss_at(model, x, y))
    g = gL(w)
    norm = torch.sqrt(_dot(g, g))
    return gL({n: w[n] + hp["rho"] * centralized(g[n]) / norm for n in w})


def friendly_sam_ref_steps(hp, model, batches, lr: float, m: int | None = None) -> list[Params]:
    """F-SAM over several SGD steps (plain ``w -= lr * grad``), from fresh state: the gradient of
    each step. ``d_t = g_t - sigma m_{t-1}`` (``d_1 = g_1``), ``m_t = lmbda m_{t-1} + (1 -
    lmbda) g_t`` (``m_1 = g_1``), gradient ``grad L(w + rho d_t/||d_t||)``. With ``m``: each
    group of ``m`` examples ascends along its own ``g_k - sigma m_{t-1}``; ``g_t`` stays the
    batch's gradient."""
    w = params_of(model)
    mom, out = None, []
    for x, y in batches:
        g = grad(loss_at(model, x, y))(w)
        size = len(y) if m is None else m
        step = {n: torch.zeros_like(t) for n, t in w.items()}
        for start in range(0, len(y), size):
            xk, yk = x[start:start + size], y[start:start + size]
            gL = grad(loss_at(model, xk, yk))
            gk = gL(w)
            d = gk if mom is None else {n: gk[n] - hp["sigma"] * mom[n] for n in gk}
            gp = gL(add(w, sam_ascent(d, hp["rho"])))
            step = {n: step[n] + len(yk) / len(y) * gp[n] for n in step}
        mom = g if mom is None else {n: hp["lmbda"] * mom[n] + (1 - hp["lmbda"]) * g[n] for n in g}
        out.append(step)
        w = {n: w[n] - lr * step[n] for n in w}
    return out


def m_sharpness_ref(name: str, hp: dict, model, x, y, m: int) -> Params:
    """Brute force: ``sum_k (n_k/N) G_k`` over consecutive groups of ``m`` examples (the last
    one smaller), ``G_k`` the method's reference gradient on group ``k`` alone (SAM: its own
    ascent from its own ``grad L_k(w)``)."""
    total = {n: torch.zeros_like(t) for n, t in params_of(model).items()}
    for start in range(0, len(y), m):
        xk, yk = x[start:start + m], y[start:start + m]
        gk = ref_grad(name, hp, model, xk, yk, [])
        total = {n: total[n] + len(yk) / len(y) * gk[n] for n in total}
    return total


MORE_REFS.update({
    "gsam": lambda hp, model, x, y, us: gsam_ref(hp, model, x, y),
    "wsam": lambda hp, model, x, y, us: wsam_ref(hp, model, x, y),
    "gcsam": lambda hp, model, x, y, us: gcsam_ref(hp, model, x, y),
    # A fresh FriendlySAM's first step ascends along g (m_1 = g_1): its own test runs several.
    "friendlysam": lambda hp, model, x, y, us: friendly_sam_ref_steps(hp, model, [(x, y)], 0.0)[0],
})

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
    "msam": {"rho": 0.3, "optimizer": MomentumStub()},
    "esam": {"rho": 0.3, "beta": 1.0, "gamma": 0.5},  # beta < 1 (random): its own tests
    "vasso": {"rho": 0.3, "theta": 0.4},
    "fisher_sam": {"rho": 0.2, "eta": 3.0},
    "gam": {"rho": 0.3, "rho_prime": 0.1, "alpha": 0.3, "beta": 0.4, "gamma": 0.5},
    "gsam": {"rho": 0.3, "alpha": 0.7},
    "wsam": {"rho": 0.3, "gamma": 0.8},
    "gcsam": {"rho": 0.3},
    "friendlysam": {"rho": 0.3, "sigma": 0.8, "lmbda": 0.6},
}
NOISY = ("rpr", "nrs", "nso", "smoothout", "adasmoothout", "rwp", "gaussian_rpr")
