"""Paying less for a method: run it every k steps, reuse what it adds in between (LookSAM),
and apply it only in a window of training. One wrapper, itself a gradient estimator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima._checks import check_choice, check_nonneg, check_positive_int
from flatminima.methods._base import Method
from flatminima.methods._gradients import all_finite, as_like, dot, global_norm, state_key
from flatminima.methods._hparams import argument, hparam
from flatminima.methods._passes import Passes, StepResult, weighted_gradient

REUSES = ("none", "looksam", "difference")


def _check_method(value: Any, name: str) -> Method:
    if not isinstance(value, Method):
        raise ValueError(f"{name} must be a flatminima method (e.g. fm.SAM()), got {value!r}")
    if isinstance(value, Every):
        raise ValueError(f"{name} is already an Every; give its options to one Every")
    return value


def _check_step(value: Any, name: str) -> int:
    return check_positive_int(value, name, minimum=0)


def _check_stop(value: Any, name: str) -> int | None:
    return None if value is None else check_positive_int(value, name, minimum=0)


def _check_unused(value: Any, name: str) -> None:
    if value is not None:
        raise ValueError(f"Every takes no {name}=: the wrapped method's own selection applies")
    return None


def _all_reduce_mean(tensors: Mapping[str, Tensor]) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        for t in tensors.values():
            dist.all_reduce(t)
            t.div_(world)


class Every(Method):
    """``method`` on every ``every``-th call within ``[start, stop)``, the plain gradient otherwise.

    A wrapper that is itself a gradient estimator: it counts its calls (``count``, the number of
    ``backward`` calls so far) and on call ``t``

    * outside the window ``start <= t < stop`` (``stop=None``: no end): ``grad L(w)``, one pass;
    * at ``t = start, start + every, ...`` (an **on-step**): the wrapped method's gradient,
      exactly as ``method.backward`` gives it;
    * between (an **off-step**): ``grad L(w)``, plus, with ``reuse``, what the last on-step's
      perturbation added to it:

      - ``reuse="none"``: nothing (Composer's SAM ``interval``);
      - ``reuse="looksam"`` (Liu et al., "Towards Efficient and Scalable Sharpness-Aware
        Minimization", CVPR 2022, Algorithm 1): on an on-step, with ``g = grad L(w)`` and the
        method's gradient ``G`` (SAM's ``g_s``), keep ``g_v = G - (<G, g> / ||g||^2) g``, the
        part orthogonal to ``g``; an off-step then accumulates
        ``g + alpha * (||g|| / ||g_v||) * g_v`` with the off-step's own ``g``. The paper's
        ``k = 5, alpha = 0.7``. The reused part has the off-step's gradient scale, which fits
        SAM-like gradients (``G ~ g``); for an objective whose gradient is a *sum* of two
        losses' (NRS: ``G ~ 2g``) the off-steps then take steps about half as large: use
        ``"difference"`` there.
      - ``reuse="difference"``: keep ``d = G - g`` and accumulate ``g + d`` (the last on-step's
        perturbation-induced gradient difference, unscaled).

    Over all parameters that receive a gradient. On an on-step with reuse, ``g`` costs nothing
    when the method computed it on its way (SAM and its family, VaSSO, Fisher SAM: their first
    sweep); for any other method (NRS, RWP, ...) one more pass per micro-batch computes it
    (statistics left alone, dropout masks replayed). Under DDP ``G`` is the averaged gradient
    and ``g`` is averaged with one more all-reduce, so every rank keeps the same ``g_v``.

    **Schedules.** ``start`` and ``stop`` are call counts; ``flatminima train`` turns its
    ``method_start``/``method_stop`` (fractions of the run's optimizer steps) into them, so
    ``method_start=0.7`` applies the method in the last 30% of training only. The wrapper counts
    calls instead of asking an optimizer or a scheduler where training is: it needs neither, and
    a loop that calls ``backward`` once per step is all it assumes.

    **State.** ``state_dict()`` holds the hyperparameters, ``count``, the reused tensors
    (``"reused"``, by parameter name) and the wrapped method's own state (``"method"``);
    ``load_state_dict`` restores all of it, so a resumed run continues the same sequence of on-
    and off-steps. A step whose gradient overflowed (``GradScaler``) leaves the reused tensors as
    they were.

    Example::

        method = fm.Every(fm.SAM(rho=0.05), every=5, reuse="looksam", alpha=0.7)
        for x, y in loader:
            method.backward(model, x, y); opt.step(); opt.zero_grad()
    """

    method = argument(None, _check_method, "the gradient estimator to apply (e.g. fm.SAM()).",
                      positional=True)
    every = hparam(1, check_positive_int, "the method runs on every every-th call, >= 1.")
    reuse = hparam("none", lambda v, n: check_choice(v, REUSES, "reuse"),
                   "what off-steps add to the plain gradient: 'none', 'looksam', 'difference'.",
                   positional=False)
    alpha = hparam(0.7, check_nonneg, "LookSAM's weight of the reused part, >= 0 (paper: 0.7).",
                   positional=False)
    start = hparam(0, _check_step, "first call (0-based) of the window the method applies in.",
                   positional=False)
    stop = hparam(None, _check_stop, "first call after the window (None: no end).",
                  positional=False, type=int | None)
    params = argument(None, _check_unused, "not used: the wrapped method's selection applies.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count = 0
        self._reused: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"Every({self.method!r}, {args})"

    @property
    def name(self) -> str:  # type: ignore[override]
        """``every(NAME)``, NAME the wrapped method's: what a checkpoint records it trained with,
        so that a resume with another wrapped method is refused."""
        return f"every({self.method.name})"

    def _validate(self) -> None:
        super()._validate()
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop must be greater than start={self.start}, got {self.stop!r}")
        self.method._validate()

    # -- which kind of step ------------------------------------------------------------------

    def phase(self, t: int | None = None) -> str:
        """``"outside"``, ``"on"`` or ``"off"`` for call ``t`` (default: the next call)."""
        t = self.count if t is None else t
        if t < self.start or (self.stop is not None and t >= self.stop):
            return "outside"
        return "on" if (t - self.start) % self.every == 0 else "off"

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        phase = self.phase()
        self.count += 1
        reuse = self.reuse != "none" and self.every > 1
        if phase == "on" and not reuse:
            return self.method._backward(step, generator)
        if phase == "on":
            return self._on_step(step, generator)
        if phase == "off" and reuse and self._reused:
            return self._off_step(step)
        return weighted_gradient(step, lambda mb: [(1.0, None)])

    # -- the reuse ---------------------------------------------------------------------------

    @staticmethod
    def _params(step: Passes) -> dict[str, nn.Parameter]:
        return {n: p for n, p in step.model.named_parameters() if p.requires_grad}

    def _on_step(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        params = self._params(step)
        # The method's own gradient G alone in p.grad (so that it is exact), then added back
        # to what p.grad held before the call.
        before = {n: p.grad for n, p in params.items()}
        for p in params.values():
            p.grad = None
        step.record_clean_gradients()
        result = self.method._backward(step, generator)
        got = {n: p.grad for n, p in params.items() if p.grad is not None}
        for n, p in params.items():
            if before[n] is not None:
                p.grad = before[n] if p.grad is None else before[n].add_(p.grad)
        inv = 1.0 / float(step.scaler.get_scale()) if step.scaler is not None else 1.0
        big_g = {n: t * inv for n, t in got.items()}
        if not all_finite(big_g):  # the step is skipped; keep the last reused part
            return result
        g = step.clean_gradient({n: params[n] for n in big_g})
        if step.ddp:
            _all_reduce_mean(g)
        if self.reuse == "looksam":
            c = dot(big_g, g) / (global_norm(g) ** 2 + 1e-12)
            kept = {n: big_g[n] - c * g[n] for n in big_g}
            norm = global_norm(kept)
            kept = {n: t / (norm + 1e-12) for n, t in kept.items()}  # stored unit length
        else:
            kept = {n: big_g[n] - g[n] for n in big_g}
        if all_finite(kept):
            self._reused = {state_key(step, n): t.detach() for n, t in kept.items()}
        return result

    def _off_step(self, step: Passes) -> StepResult:
        params = self._params(step)
        before = {n: p.grad for n, p in params.items()}
        for p in params.values():
            p.grad = None
        result = weighted_gradient(step, lambda mb: [(1.0, None)])
        scale = float(step.scaler.get_scale()) if step.scaler is not None else 1.0
        got = {n: p.grad for n, p in params.items() if p.grad is not None}
        reused = {n: as_like(self._reused[state_key(step, n)], params[n]) for n in got
                  if state_key(step, n) in self._reused}
        # p.grad holds S * g (S the scaler's scale, 1 without one); the reused part goes in at
        # the same scale. LookSAM: S * alpha * ||g|| * g_v/||g_v|| = alpha * ||S g|| * (unit g_v).
        coef = float(self.alpha) * global_norm(got) if self.reuse == "looksam" else scale
        finite = all(bool(torch.isfinite(t).all()) for t in got.values())
        for n, p in params.items():
            if finite and n in reused:
                p.grad.add_(reused[n], alpha=coef)
            if before[n] is not None:
                p.grad = before[n] if p.grad is None else before[n].add_(p.grad)
        return result

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, ``count``, the reused tensors and the wrapped method's state."""
        return {**super().state_dict(), "count": self.count,
                "reused": {k: t.clone() for k, t in self._reused.items()},
                "method": self.method.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = dict(state)
        count = state.pop("count", 0)
        reused = state.pop("reused", {})
        inner = state.pop("method", None)
        super().load_state_dict(state)
        if inner is not None:
            self.method.load_state_dict(inner)
        self.count = check_positive_int(count, "count", minimum=0)
        self._reused = {str(k): t.detach().clone() for k, t in reused.items()}
