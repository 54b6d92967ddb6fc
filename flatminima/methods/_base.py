"""The method base classes: a gradient estimator, and one with a random perturbation.

A method computes the gradient of its objective at the current weights and accumulates it into
``p.grad``; it never moves the weights. Its passes go through the one pass primitive
(:mod:`flatminima.methods._passes`), which owns the guarantees every method gives (weights
untouched, statistics updated once, dropout masks replayed, micro-batches, scaler, DDP); its
arguments are declared once (:mod:`flatminima.methods._hparams`). A new method is one file:
``examples/gaussian_rpr.py`` is the worked example (a registered RandomPerturbation with one
hyperparameter, its default noise and a two-term weighted gradient).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima import noise as noise_lib
from flatminima._checks import check_bool, check_callable
from flatminima._nn import LossFn
from flatminima._params import ParamSpec, freeze_selection, select_params
from flatminima.methods import _hparams
from flatminima.methods._hparams import HParam, argument, option
from flatminima.methods._passes import SHARDED, Passes, StepResult

NoiseFn = Callable[[dict[str, Tensor], "torch.Generator | None"], dict[str, Tensor]]


def _check_selection(value: Any, name: str) -> ParamSpec:
    return freeze_selection(value)


def poison_grads(params: Sequence[Tensor]) -> None:
    """Make ``scaler.step`` skip this step: an overflow happened in a pass whose result was used."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.view(-1)[0] = float("inf")
        return


def broadcast_noise(u: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make every DDP rank use rank 0's perturbation."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for t in u.values():
            dist.broadcast(t, src=0)
    return u


class Method:
    """A gradient estimator: ``backward`` accumulates the gradient of its objective into ``p.grad``.

    Subclasses declare their arguments as class attributes (:func:`hparam`, :func:`option`,
    :func:`argument`) and implement ``_backward(step, generator)`` on a :class:`Passes`. The
    hyperparameters are plain attributes, checked at construction and on every call, so a
    schedule may change them between steps (``method.rho = 0.1``).
    """

    name: ClassVar[str] = "method"
    # Whether the method runs on a model sharded with FSDP2 (fully_shard): only one whose every
    # pass is at w (Baseline); the others are refused at the call, see ``_passes.SHARDED``.
    runs_sharded: ClassVar[bool] = False
    declared: ClassVar[dict[str, HParam]] = {}

    params = argument(None, _check_selection,
                      "which parameters are perturbed: None (all trainable), a list of names, a "
                      "predicate, 'weights', 'no_norm' or 'last_layer'.",
                      convert=freeze_selection)

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.declared = _hparams.collect(cls)
        cls.__signature__ = _hparams.signature(cls.declared)  # type: ignore[attr-defined]
        if cls.__doc__ and "Args:" not in cls.__doc__:
            cls.__doc__ = cls.__doc__.rstrip() + "\n\n" + _hparams.describe(cls.declared) + "\n"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            bound = type(self).__signature__.bind(*args, **kwargs)  # type: ignore[attr-defined]
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}(): {e}") from None
        for name, decl in self.declared.items():
            setattr(self, name, bound.arguments.get(name, decl.default))
        self._last_layer: tuple[weakref.ref[nn.Module], tuple[str, ...]] | None = None
        self._validate()

    # -- public API --------------------------------------------------------------------------

    def backward(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Any,
        loss_fn: LossFn = F.cross_entropy,
        *,
        scaler: torch.amp.GradScaler | None = None,
        generator: torch.Generator | None = None,
    ) -> StepResult:
        """Accumulate the gradient of this method's objective into ``p.grad``; see the class doc.

        ``inputs``/``targets`` are tensors or equal-length lists of micro-batches; ``loss_fn``
        returns the batch mean; ``scaler`` a ``torch.amp.GradScaler``; ``generator`` drives the
        random perturbation.
        """
        self._validate()
        step = Passes(model, inputs, targets, loss_fn, scaler)
        if step.sharded and not self.runs_sharded:
            raise NotImplementedError(SHARDED)  # before any pass or draw: p.grad untouched
        return self._backward(step, generator)

    @classmethod
    def config_keys(cls) -> dict[str, HParam]:
        """The arguments a configuration file or the command line may set, by name."""
        return {n: d for n, d in cls.declared.items() if d.kind != "argument"}

    def hparams(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n, d in self.declared.items() if d.kind == "hparam"}

    def state_dict(self) -> dict[str, Any]:
        """The hyperparameters; a method with state between calls (VaSSO's moving average,
        ``Every``'s step count) adds it, and its ``load_state_dict`` takes it back."""
        return dict(self.hparams())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        known = self.hparams()
        unknown = set(state) - set(known)
        if unknown:
            raise ValueError(f"unknown {self.name} hyperparameter {sorted(unknown)[0]!r}")
        for k, v in state.items():
            setattr(self, k, v)
        self._validate()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({args})"

    # -- for subclasses ----------------------------------------------------------------------

    def _validate(self) -> None:
        """Check every declared argument; ``ValueError`` names the bad one."""
        for name, decl in self.declared.items():
            decl.validated(getattr(self, name))

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        raise NotImplementedError

    def selected_params(self, step: Passes) -> dict[str, nn.Parameter]:
        """The parameters ``params=`` selects on this call's model (a ``ValueError`` if none).

        ``"last_layer"`` is found once per model (a forward pass with hooks on two examples).
        """
        model = step.model
        if self.params != "last_layer":
            return select_params(model, self.params)
        if self._last_layer is None or self._last_layer[0]() is not model:
            x = step.micro_batches[0].inputs
            names = tuple(select_params(model, "last_layer", x))
            self._last_layer = (weakref.ref(model), names)
        return select_params(model, list(self._last_layer[1]))


class RandomPerturbation(Method):
    """A method whose perturbation ``u`` is random: it takes ``noise=`` and ``share_noise=``.

    ``noise`` is a callable ``(params: dict[str, Tensor], generator) -> dict[str, Tensor]``;
    without it :meth:`default_noise` builds the method's own distribution from its
    hyperparameters, anew on every call so that a schedule may change them.
    """

    noise = argument(None, lambda v, n: check_callable(v, n, optional=True),
                     "a sampler (params, generator) -> {name: u}; overrides the default "
                     "distribution.")
    share_noise = option(False, check_bool,
                         "under DDP, every rank uses rank 0's perturbation (default: each rank "
                         "draws its own, the NRS paper's scheme).")

    def default_noise(self) -> NoiseFn:
        raise NotImplementedError

    def noise_fn(self) -> NoiseFn:
        return self.noise if self.noise is not None else self.default_noise()

    def draw(
        self, step: Passes, generator: torch.Generator | None, noise: NoiseFn | None = None
    ) -> dict[str, Tensor]:
        """One perturbation of the selected parameters: checked for names and shapes, detached,
        rank 0's on every rank with ``share_noise``."""
        params = self.selected_params(step)
        noise = noise or self.noise_fn()
        u = noise({n: p.detach() for n, p in params.items()}, generator)
        noise_lib.check_noise_output(u, params, noise)
        u = {n: u[n].detach().to(dtype=p.dtype, device=p.device) for n, p in params.items()}
        if self.share_noise:
            u = broadcast_noise(u)
        return u
