"""A closure-style optimizer: any ``torch.optim`` optimizer and a method behind one object.

Code written for the two-step SAM optimizers (``first_step`` / ``second_step``, the API of
davda54/sam) or for ``optimizer.step(closure)`` switches by changing the construction line::

    # before: optimizer = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    optimizer = FlatOptimizer(model, torch.optim.SGD, fm.SAM(rho=0.05), lr=0.1, momentum=0.9)

Two ways to drive it, with different guarantees:

* ``step(closure)`` with a closure that **returns the loss without calling backward** (or
  ``(loss, logits)``, which NRS needs for its divergence). The closure runs once per pass of the
  method, each time with the model's parameters at ``w + v`` (``torch.func``, the weights are never
  moved), inside the pass primitive: every guarantee of ``Method.backward`` holds (weights
  bitwise unchanged, normalization statistics updated once, dropout masks replayed, AMP scaler,
  DDP reduced once when ``model`` is the ``DistributedDataParallel`` wrapper), for every method.
  One closure is one batch (micro-batches: ``method.backward`` with lists).
* ``first_step()`` / ``second_step()`` around the user's own second forward and backward, as in
  davda54/sam. The weights must then really be moved between the two steps (the user's code
  runs the model at its current weights); they are restored bitwise from a copy. For methods
  of that shape only: SAM and ASAM (ascent from the gradient already in ``p.grad``), RPR,
  SmoothOut, AdaSmoothOut, RWP, Baseline. Kept: weights restored bitwise, normalization
  statistics updated once (frozen between the two steps), AMP (the ascent is scale-free; pass
  ``scaler=`` to ``second_step``), accumulation (accumulate both backwards over micro-batches).
  Lost: the dropout masks of the two passes differ (the first forward ran before this object
  was called, so its RNG state is unknown), and under DDP both backwards all-reduce (the ascent
  then comes from the all-reduced gradient; wrap the first in ``model.no_sync()`` for
  per-device ascents).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

import flatminima as fm
from flatminima._nn import ModelLoss, frozen_norm_stats
from flatminima.methods import Method, Passes, StepResult
from flatminima.methods._base import poison_grads

Closure = Callable[[], Any]

_DUMMY = torch.empty(1)  # the inputs of a closure's passes: one batch, no tensor of its own


def _method(method: Method | str) -> Method:
    if isinstance(method, str):
        return fm.create_method(method)
    if not isinstance(method, Method):
        raise ValueError(f"method must be a flatminima Method or a registry name, got {method!r}")
    return method


class FlatOptimizer(torch.optim.Optimizer):
    """``base_optimizer`` stepping on the gradient of ``method``'s objective.

    Args:
        model: the module the closure (or the user's code) runs; the ``DistributedDataParallel``
            wrapper under DDP. Its normalization layers are found here.
        base_optimizer: an optimizer instance, or an optimizer class built here on ``params``
            (default ``model.parameters()``) with ``**optimizer_kwargs``.
        method: a :class:`flatminima.Method` or a registry name (its defaults).
        params: parameters or parameter groups for a ``base_optimizer`` class.
        generator: the ``torch.Generator`` of the random perturbations (saved in
            :meth:`state_dict`).

    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's own objects, so a
    learning-rate scheduler built on this object (or on ``.base_optimizer``) changes the learning
    rate the base optimizer uses; ``torch.amp.GradScaler.step(this)`` works too.
    """

    def __init__(
        self,
        model: nn.Module,
        base_optimizer: torch.optim.Optimizer | type[torch.optim.Optimizer],
        method: Method | str,
        *,
        params: Iterable[Any] | None = None,
        generator: torch.Generator | None = None,
        **optimizer_kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if params is not None or optimizer_kwargs:
                raise ValueError("an optimizer instance takes no params= or optimizer arguments "
                                 f"(got {sorted(optimizer_kwargs) or ['params']})")
            base = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            base = base_optimizer(model.parameters() if params is None else params,
                                  **optimizer_kwargs)
        else:
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer or its class, got "
                             f"{base_optimizer!r}")
        method = _method(method)
        if "optimizer" in method.declared and method.optimizer is None:
            method.optimizer = base  # MSAM reads the base optimizer's momentum, never steps it
        if method.params == "last_layer":
            raise ValueError("FlatOptimizer does not see the inputs, so params='last_layer' "
                             "cannot be found: name the parameters instead")
        # Optimizer's own set-up (hooks, step profiling), then share the base's objects.
        super().__init__(base.param_groups, base.defaults)
        self.model = model
        self.base_optimizer = base
        self.method = method
        self.generator = generator
        self.last_result: StepResult | None = None
        self._two_step: dict[str, Any] | None = None
        self.param_groups = base.param_groups
        self.state = base.state
        self.defaults = base.defaults

    # -- the closure form: every guarantee -------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, scaler: Any = None) -> Any:  # type: ignore[override]
        """With a ``closure`` (the loss at the weights it runs at, without backward): accumulate
        the method's gradient and step; returns the clean loss. Without: step the base
        optimizer on ``p.grad`` as it is (``scaler.step`` when ``scaler`` is given)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                self.last_result = self.backward(closure, scaler=scaler)
            loss = self.last_result.loss
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        return loss

    def backward(self, closure: Closure, *, scaler: Any = None) -> StepResult:
        """Accumulate the method's gradient into ``p.grad`` through ``closure``; no step."""
        if not callable(closure):
            raise ValueError(f"closure must be callable, got {closure!r}")
        params = [p for g in self.param_groups for p in g["params"]]

        def versions() -> list[Any]:
            return [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]

        def run(model: nn.Module, inputs: Any, targets: Any) -> Any:
            before = versions()
            out = closure()
            if versions() != before:
                raise RuntimeError(
                    "the closure called backward(): FlatOptimizer.step(closure) runs the method's "
                    "backward passes itself, so the closure must return the loss (or (loss, "
                    "logits)) without calling backward; code written for SAM's step(closure) can "
                    "keep its loop with first_step()/second_step() instead"
                )
            return out

        return self.method.backward(self.model, _DUMMY, None, ModelLoss(run), scaler=scaler,
                                    generator=self.generator)

    # -- the two-step form of davda54/sam ----------------------------------------------------

    def _two_step_kind(self) -> str:
        from flatminima.methods import ASAM, RPR, RWP, SAM, AdaSmoothOut, Baseline, SmoothOut

        kind = type(self.method)
        if kind in (SAM, ASAM) and getattr(self.method, "m", None) is None:
            return "ascent"
        if kind in (RPR, SmoothOut, AdaSmoothOut):
            return "random"
        if kind is RWP:
            return "mixed"
        if kind is Baseline:
            return "none"
        raise NotImplementedError(
            f"first_step/second_step compute grad L(w + e) from one perturbation; "
            f"{self.method.name} needs more than that (use step(closure) or method.backward): "
            "SAM, ASAM (m=None), RPR, SmoothOut, AdaSmoothOut, RWP and Baseline have this shape"
        )

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move the weights to ``w + e`` (SAM's ascent from ``p.grad``, or a random draw) and
        freeze the normalization statistics until :meth:`second_step`."""
        if self._two_step is not None:
            raise RuntimeError("first_step called twice without second_step")
        kind = self._two_step_kind()
        self.method._validate()
        step = Passes(self.model, _DUMMY, None, ModelLoss(lambda *a: None))
        selected = self.method.selected_params(step)
        overflow = False
        if kind == "ascent":
            grads = {n: p.grad if p.grad is not None else torch.zeros_like(p)
                     for n, p in selected.items()}
            overflow = not all(bool(torch.isfinite(g).all()) for g in grads.values())
            e = ({n: torch.zeros_like(p) for n, p in selected.items()} if overflow
                 else self.method._ascent(selected, grads))
        elif kind in ("random", "mixed"):
            e = self.method.draw(step, self.generator)
        else:
            e = {}
        state: dict[str, Any] = {"overflow": overflow, "saved": {}, "clean": None}
        if kind == "mixed":  # RWP: (1 - mix) * grad L(w) joins the perturbed gradient
            state["clean"] = {p: p.grad.clone() for g in self.param_groups for p in g["params"]
                              if p.grad is not None}
            state["zeroed"] = zero_grad
        for n, p in selected.items():
            if n in e:
                state["saved"][p] = p.detach().clone()
                p.add_(e[n])
        frozen = contextlib.ExitStack()
        frozen.enter_context(frozen_norm_stats(self.model))
        state["frozen"] = frozen
        self._two_step = state
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, scaler: Any = None) -> None:
        """Restore the weights bitwise, combine the gradients (RWP), and step the base optimizer
        (``scaler.step`` when a ``GradScaler`` is given)."""
        state = self._two_step
        if state is None:
            raise RuntimeError("second_step called without first_step")
        self._two_step = None
        state["frozen"].close()
        for p, w in state["saved"].items():
            p.copy_(w)
        if state["clean"] is not None:
            mix = float(self.method.mix)
            for g in self.param_groups:
                for p in g["params"]:
                    clean = state["clean"].get(p)
                    if p.grad is None and clean is None:
                        continue
                    pert = p.grad if p.grad is not None else torch.zeros_like(p)
                    if clean is not None and not state["zeroed"]:
                        pert = pert - clean  # the second backward accumulated on top
                    total = mix * pert + ((1 - mix) * clean if clean is not None else 0.0)
                    p.grad = total if p.grad is None else p.grad.copy_(total)
        if state["overflow"]:
            poison_grads([p for g in self.param_groups for p in g["params"]])
        if scaler is not None:
            scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    # -- the rest of the optimizer interface ---------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # Optimizer.__init__ taking the base's groups
            return super().add_param_group(param_group)
        self.base_optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, the method's hyperparameters and the generator's state."""
        return {
            "base": self.base_optimizer.state_dict(),
            "method": {"name": self.method.name, "hparams": self.method.state_dict()},
            "generator": self.generator.get_state() if self.generator is not None else None,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        missing = {"base", "method"} - set(state_dict)
        if missing:
            raise ValueError(f"not a FlatOptimizer state: no {sorted(missing)[0]!r} entry")
        name = state_dict["method"]["name"]
        if name != self.method.name:
            raise ValueError(f"state of method {name!r} given to a {self.method.name!r} optimizer")
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.method.load_state_dict(state_dict["method"]["hparams"])
        gen = state_dict.get("generator")
        if gen is not None and self.generator is not None:
            self.generator.set_state(gen)

    def __repr__(self) -> str:
        return f"FlatOptimizer({self.method!r}, {type(self.base_optimizer).__name__})"

    def __getstate__(self) -> dict[str, Any]:  # Optimizer's keeps only its own three fields
        return dict(self.__dict__)
