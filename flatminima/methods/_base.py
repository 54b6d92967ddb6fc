"""Shared plumbing of the gradient estimators.

A method never touches the weights in place. A perturbed pass evaluates the model through
``torch.func.functional_call`` at ``w + v`` (``v`` detached), so

* the weights are bitwise the same after every call, whatever the method did;
* ``d/dw L(f(w + v)) = grad L(w + v)``, and NRS can backpropagate through the clean and the
  perturbed branch of one objective without an in-place change breaking autograd;
* the gradient lands in ``p.grad`` of the real parameters, where any optimizer, scaler, gradient
  clipping or ``DistributedDataParallel`` hook expects it.

Per call, in every method:

* BatchNorm running statistics are updated by the clean pass only: perturbed passes run with
  ``track_running_stats`` switched off, so they normalize with batch statistics (as in training) and
  leave the buffers (and ``num_batches_tracked``, which ``momentum=None`` uses) untouched.
* Dropout draws the same masks in every pass over the same micro-batch (the global RNG is replayed),
  so NRS's divergence and SAM's ascent measure the weight perturbation, not dropout noise.
* Micro-batches (lists of inputs/targets) share one perturbation; micro-batch ``m`` enters with
  weight ``n_m / N``, so with a mean-reduced ``loss_fn`` the accumulated gradient is the full-batch
  one.
* Under ``DistributedDataParallel`` every forward but the last runs in ``no_sync()``, so gradients
  are all-reduced once per call.
* With ``scaler=`` every backward is scaled; gradients a method reads back (SAM's ascent) are
  unscaled, and a non-finite value there poisons ``p.grad`` so that ``scaler.step`` skips the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flatminima import noise as noise_lib

LossFn = Callable[[Tensor, Tensor], Tensor]
Term = tuple[float, "Mapping[str, Tensor] | None"]
Batch = tuple[Tensor, Tensor]


@dataclass
class StepResult:
    """What ``Method.backward`` returns.

    ``loss``: clean loss at ``w`` (0-d, detached; size-weighted mean over micro-batches).
    ``logits``: detached clean outputs, concatenated over micro-batches (``None`` if not computed).
    ``perturbed_loss``: mean loss at the perturbed weights, where the method has one.
    ``divergence``: NRS's ``KL(f_w || f_{w+u})`` term (before ``alpha``), where computed.
    """

    loss: Tensor
    logits: Tensor | None = None
    perturbed_loss: Tensor | None = None
    divergence: Tensor | None = None


# ----------------------------------------------------------------------------- argument checks


def check_nonneg(value: Any, name: str) -> float:
    """``value`` as a finite float ``>= 0``, or ``ValueError`` naming it."""
    return noise_lib.check_radius(value, name)


def check_unit_interval(value: Any, name: str) -> float:
    f = check_nonneg(value, name)
    if f > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return f


def check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def split_micro_batches(inputs: Any, targets: Any) -> list[Batch]:
    """Normalize ``inputs, targets`` to a list of ``(x, y)`` micro-batches."""
    if isinstance(inputs, (list, tuple)) or isinstance(targets, (list, tuple)):
        if not isinstance(inputs, (list, tuple)) or not isinstance(targets, (list, tuple)):
            raise ValueError("inputs and targets must both be tensors or both be lists")
        if len(inputs) != len(targets):
            raise ValueError(
                f"got {len(inputs)} input micro-batches but {len(targets)} target micro-batches"
            )
        if len(inputs) == 0:
            raise ValueError("empty list of micro-batches")
        return list(zip(inputs, targets, strict=True))
    return [(inputs, targets)]


def batch_size(x: Any) -> int:
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() > 0 else 1
    if isinstance(x, (list, tuple)) and x:
        return batch_size(x[0])
    if isinstance(x, Mapping) and x:
        return batch_size(next(iter(x.values())))
    raise ValueError(f"cannot infer the batch size of inputs of type {type(x).__name__}")


# ----------------------------------------------------------------------------- model plumbing


def forward_at(model: nn.Module, x: Any, offsets: Mapping[str, Tensor] | None) -> Tensor:
    """``f_{w+v}(x)``: the model evaluated with ``v = offsets[name]`` added to named parameters.

    The offsets are constants; gradients flow to the real parameters. ``None`` is the clean pass.
    """
    if not offsets:
        return model(x)
    params = dict(model.named_parameters())
    moved = {n: params[n] + v for n, v in offsets.items()}
    return functional_call(model, moved, (x,), strict=False)


def _norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._NormBase]:
    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and m.training
    ]


@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """Run training-mode forwards that use batch statistics but update no running statistics.

    Works for BatchNorm1d/2d/3d, SyncBatchNorm and InstanceNorm with tracked stats, also with
    ``momentum=None`` (``num_batches_tracked`` is not incremented either).
    """
    layers = _norm_layers(model)
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class RngReplay:
    """Snapshot of the global RNGs (CPU and the model's accelerator) to replay dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.accel = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            torch.cuda.set_rng_state(self.accel, self.device)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def sync_context(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager[Any]:
    """``model.no_sync()`` for every pass but the last, so DDP all-reduces once per call."""
    if sync or not is_ddp(model):
        return contextlib.nullcontext()
    return model.no_sync()


def run_backward(loss: Tensor, scaler: torch.amp.GradScaler | None) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def poison_grads(params: Sequence[Tensor]) -> None:
    """Make ``scaler.step`` skip this step: an overflow happened in a pass whose result was used."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        p.grad.view(-1)[0] = float("inf")
        return


def weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i weights[i] * values[i]`` of detached scalars, in the values' own dtype."""
    return torch.stack([v.detach() * w for v, w in zip(values, weights, strict=True)]).sum()


def broadcast_noise(u: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make every DDP rank use rank 0's perturbation."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        for t in u.values():
            dist.broadcast(t, src=0)
    return u


# ----------------------------------------------------------------------------- base class


class Method:
    """A gradient estimator: ``backward`` accumulates the gradient of its objective into ``p.grad``.

    Subclasses implement ``_backward``; the hyperparameters are plain attributes listed in
    ``_hparam_names`` and are validated by ``_validate`` at construction and on every call, so a
    schedule may change them between steps.
    """

    name: str = "method"
    _hparam_names: tuple[str, ...] = ()

    def __init__(self, *, params: Any = None, share_noise: bool = False) -> None:
        self.params = params
        self.share_noise = bool(share_noise)

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
        """Accumulate the gradient of this method's objective into ``p.grad``; see the class doc."""
        self._validate()
        micro = split_micro_batches(inputs, targets)
        sizes = [batch_size(x) for x, _ in micro]
        total = float(sum(sizes))
        weights = [n / total for n in sizes]
        return self._backward(model, micro, weights, loss_fn, scaler, generator)

    def hparams(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._hparam_names}

    def state_dict(self) -> dict[str, Any]:
        """The hyperparameters (methods keep no other state between calls)."""
        return dict(self.hparams())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = set(state) - set(self._hparam_names)
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
        """Check hyperparameters; raise ``ValueError`` naming the bad value."""

    def _backward(
        self,
        model: nn.Module,
        micro: list[Batch],
        weights: list[float],
        loss_fn: LossFn,
        scaler: torch.amp.GradScaler | None,
        generator: torch.Generator | None,
    ) -> StepResult:
        raise NotImplementedError

    def _perturbed_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return noise_lib.named_trainable_params(model, self.params)

    def _draw(
        self,
        noise_fn: Callable[..., dict[str, Tensor]],
        params: dict[str, nn.Parameter],
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """Draw one perturbation, checked for shape, detached, shared across ranks on request."""
        detached = {n: p.detach() for n, p in params.items()}
        u = noise_fn(detached, generator)
        noise_lib.check_noise_output(u, params, noise_fn)
        u = {n: u[n].detach().to(dtype=p.dtype, device=p.device) for n, p in params.items()}
        if self.share_noise:
            u = broadcast_noise(u)
        return u


# ----------------------------------------------------------------------------- weighted passes


def weighted_passes(
    model: nn.Module,
    micro: list[Batch],
    weights: list[float],
    loss_fn: LossFn,
    scaler: torch.amp.GradScaler | None,
    terms: Sequence[Term] | Sequence[Sequence[Term]],
    *,
    per_micro_batch: bool = False,
) -> StepResult:
    """Accumulate ``sum_j c_j * grad L(w + v_j)`` for ``terms = [(c_j, v_j), ...]``.

    With ``per_micro_batch=True``, ``terms[m]`` is the list for micro-batch ``m`` (SmoothOut's fresh
    noise per ghost batch); otherwise every micro-batch shares ``terms``.

    ``terms[0]`` must be the clean pass (``v_0 = None``); it runs first on each micro-batch, updates
    the normalization statistics and gives the clean loss and logits. A pass with ``c_j = 0`` runs
    without a graph (the clean pass of RPR, SmoothOut, NSO with ``lam = 0``). One autograd graph is
    alive at a time.
    """
    plan = list(terms) if per_micro_batch else [terms] * len(micro)
    if len(plan) != len(micro) or any(not t or t[0][1] is not None for t in plan):
        raise ValueError("each micro-batch needs a term list starting with the clean pass")
    active = [(m, j) for m, ts in enumerate(plan) for j, (c, _) in enumerate(ts) if c != 0.0]
    last_active = active[-1] if active else None
    clean_losses: list[Tensor] = []
    pert_losses: list[Tensor] = []
    pert_weights: list[float] = []
    logits_out: list[Tensor] = []
    for m, ((x, y), w_m) in enumerate(zip(micro, weights, strict=True)):
        rng = RngReplay(model_device(model))
        terms_m = plan[m]
        perturbed_weight = sum(c for c, v in terms_m if v is not None)
        for j, (c, v) in enumerate(terms_m):
            rng.restore()
            grad_needed = c != 0.0
            stats = contextlib.nullcontext() if v is None else frozen_norm_stats(model)
            sync = sync_context(model, (m, j) == last_active)
            with sync, stats, torch.set_grad_enabled(grad_needed and torch.is_grad_enabled()):
                out = forward_at(model, x, v)
                loss = loss_fn(out, y)
                if grad_needed:
                    run_backward(loss * (c * w_m), scaler)
            if v is None:
                clean_losses.append(loss)
                logits_out.append(out.detach())
            elif perturbed_weight:
                pert_losses.append(loss)
                pert_weights.append(w_m * c / perturbed_weight)
    logits = torch.cat(logits_out) if len(logits_out) > 1 else logits_out[0]
    clean_loss = weighted_sum(clean_losses, weights)
    perturbed = weighted_sum(pert_losses, pert_weights) if pert_losses else None
    return StepResult(clean_loss, logits, perturbed)
