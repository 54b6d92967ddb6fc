"""The one pass primitive: a forward pass of the model at ``w + v`` inside a method's call.

Every method is written as passes over the micro-batches of one ``backward`` call::

    step = Passes(model, inputs, targets, loss_fn, scaler)
    for mb in step:                                  # a MicroBatch, weight n_m / N
        clean = mb.forward()                         # f_w(x): loss, logits, BatchNorm statistics
        pert = mb.forward(u, final=True)             # f_{w+u}(x)
        mb.backward(clean.loss + pert.loss)          # d/dw [(n_m / N) * objective] into p.grad
    return step.result()

and this module alone keeps the promises of the README, for every method:

* **The weights are never moved.** A pass at ``w + v`` runs through
  ``torch.func.functional_call`` with ``v`` detached, so ``d/dw L(f(w + v)) = grad L(w + v)``
  lands in ``p.grad`` of the real parameters and the weights are bitwise unchanged.
* **Dropout masks are the same in every pass over a micro-batch**: the global RNG (CPU and the
  model's accelerator) is recorded before the micro-batch's first pass and replayed before each
  later one, also across sweeps (SAM's second pass over all micro-batches).
* **Normalization statistics are updated once, by the clean pass**: a pass at ``w + v`` runs
  with ``track_running_stats`` off, so it normalizes with batch statistics and leaves every
  buffer alone (``num_batches_tracked`` too, which ``momentum=None`` uses).
* **DDP reduces once per call**: every forward runs in ``model.no_sync()`` except the one marked
  ``final`` on the last micro-batch, whose backward then all-reduces the accumulated gradient;
  a forward with a graph after it is refused, since DDP would reduce too early.
* **Micro-batches are weighted** ``n_m / N`` by :meth:`MicroBatch.backward`, so with a
  mean-reduced ``loss_fn`` the accumulated gradient is the full-batch one; every backward is
  scaled by the ``GradScaler`` when one is given.
* **The outputs and losses are gathered** into the :class:`StepResult`: the clean loss (size-
  weighted mean), the clean logits concatenated over micro-batches, the perturbed loss.
* A model that returns a tuple (logits and features) is read through its first element.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatminima._nn import (
    LossFn,
    frozen_norm_stats,
    model_device,
    primary_output,
    tracking_norm_layers,
)

Offsets = Mapping[str, Tensor] | None


@dataclass
class StepResult:
    """What ``Method.backward`` returns.

    ``loss``: clean loss at ``w`` (0-d, detached; size-weighted mean over micro-batches).
    ``logits``: detached clean outputs, concatenated over micro-batches.
    ``perturbed_loss``: mean loss at the perturbed weights, where the method has one.
    ``divergence``: NRS's ``KL(f_w || f_{w+u})`` term (before ``alpha``), where computed.
    """

    loss: Tensor
    logits: Tensor | None = None
    perturbed_loss: Tensor | None = None
    divergence: Tensor | None = None


class Pass(NamedTuple):
    """One forward pass: the model's (primary) outputs and ``loss_fn`` of them."""

    outputs: Tensor
    loss: Tensor


def split_micro_batches(inputs: Any, targets: Any) -> list[tuple[Any, Any]]:
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
    """The number of examples in ``x`` (a tensor, or a list/tuple/dict of them)."""
    if isinstance(x, Tensor):
        return x.shape[0] if x.dim() > 0 else 1
    if isinstance(x, (list, tuple)) and x:
        return batch_size(x[0])
    if isinstance(x, Mapping) and x:
        return batch_size(next(iter(x.values())))
    raise ValueError(f"cannot infer the batch size of inputs of type {type(x).__name__}")


def forward_at(model: nn.Module, x: Any, offsets: Offsets) -> Any:
    """``f_{w+v}(x)``: the model with ``v = offsets[name]`` added to the named parameters.

    The offsets are constants; gradients flow to the real parameters. ``None`` (or an empty
    mapping) is the clean pass, the model's own forward.
    """
    if not offsets:
        return model(x)
    params = dict(model.named_parameters())
    moved = {n: params[n] + v for n, v in offsets.items()}
    return functional_call(model, moved, (x,), strict=False)


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


def weighted_sum(values: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i weights[i] * values[i]`` of detached scalars, in the values' own dtype."""
    return torch.stack([v.detach() * w for v, w in zip(values, weights, strict=True)]).sum()


class MicroBatch:
    """One micro-batch of a call: its inputs, targets and weight ``n_m / N``, and its passes."""

    def __init__(self, step: Passes, index: int, inputs: Any, targets: Any, weight: float):
        self.step = step
        self.index = index
        self.inputs = inputs
        self.targets = targets
        self.weight = weight
        self.clean: Pass | None = None
        self.perturbed: list[tuple[Tensor, float]] = []
        self._rng: RngReplay | None = None

    @property
    def is_last(self) -> bool:
        return self.index == len(self.step.micro_batches) - 1

    def forward(
        self,
        offsets: Offsets = None,
        *,
        grad: bool = True,
        final: bool = False,
        loss_weight: float = 1.0,
    ) -> Pass:
        """The model's outputs and loss at ``w + offsets`` (``None``: at ``w``) on this batch.

        ``grad=False`` runs without a graph (a clean pass that only reports the loss and updates
        the statistics). ``final=True`` marks the last forward of this micro-batch whose graph
        reaches ``p.grad``; on the last micro-batch it is the one DDP synchronizes on.
        ``loss_weight`` is the pass's weight in the reported perturbed loss (``0``: not
        reported). The first clean pass of a micro-batch gives its clean loss and logits.
        """
        step = self.step
        grad = grad and torch.is_grad_enabled()
        synced = final and self.is_last
        if step.synced and grad:
            raise RuntimeError("a forward pass with a graph after the final one: DDP would "
                               "reduce the gradient before this pass reaches it")
        if self._rng is None:
            self._rng = RngReplay(step.device)
        else:
            self._rng.restore()
        ddp = step.model.no_sync() if step.ddp and not synced else contextlib.nullcontext()
        stats = contextlib.nullcontext() if not offsets else frozen_norm_stats(step.norm_layers)
        with ddp, stats, torch.set_grad_enabled(grad):
            outputs = primary_output(forward_at(step.model, self.inputs, offsets))
            loss = step.loss_fn(outputs, self.targets)
        step.synced = step.synced or (synced and grad)
        result = Pass(outputs, loss)
        if not offsets:
            if self.clean is None:
                self.clean = Pass(outputs.detach(), loss.detach())
        elif loss_weight:
            self.perturbed.append((loss.detach(), float(loss_weight)))
        return result

    def backward(self, objective: Tensor) -> None:
        """Accumulate ``d/dw [weight * objective]`` into ``p.grad`` (scaled by the scaler)."""
        scaled = objective * self.weight
        scaler = self.step.scaler
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    def gradient(self, objective: Tensor, tensors: Sequence[Tensor]) -> list[Tensor | None]:
        """``d/dt [weight * objective]`` for each of ``tensors``, unscaled, ``p.grad`` untouched.

        The backward runs scaled when a scaler is given (so float16 gradients do not underflow)
        and the result is divided by the scale; ``None`` where a tensor is unused.
        """
        scaler = self.step.scaler
        scaled = objective * self.weight
        if scaler is not None:
            scaled = scaler.scale(scaled)
        grads = torch.autograd.grad(scaled, list(tensors), allow_unused=True)
        if scaler is None:
            return list(grads)
        inv = 1.0 / float(scaler.get_scale())
        return [g * inv if g is not None else None for g in grads]


class Passes:
    """The passes of one ``Method.backward`` call: iterate it for its :class:`MicroBatch` es.

    Iterating again (a second sweep, as SAM's) yields the same micro-batches, whose RNG
    snapshots then replay the first sweep's dropout masks.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Any,
        targets: Any,
        loss_fn: LossFn,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        micro = split_micro_batches(inputs, targets)
        sizes = [batch_size(x) for x, _ in micro]
        total = float(sum(sizes))
        self.model = model
        self.loss_fn = loss_fn
        self.scaler = scaler
        self.device = model_device(model)
        self.ddp = isinstance(model, nn.parallel.DistributedDataParallel)
        self.norm_layers = tracking_norm_layers(model)
        self.synced = False
        self.micro_batches = [
            MicroBatch(self, m, x, y, n / total)
            for m, ((x, y), n) in enumerate(zip(micro, sizes, strict=True))
        ]

    def __iter__(self) -> Iterator[MicroBatch]:
        return iter(self.micro_batches)

    def __len__(self) -> int:
        return len(self.micro_batches)

    @property
    def weights(self) -> list[float]:
        return [mb.weight for mb in self.micro_batches]

    def mean(self, values: Sequence[Tensor]) -> Tensor:
        """The size-weighted mean over micro-batches of one detached scalar each."""
        return weighted_sum(values, self.weights)

    def result(self, divergence: Sequence[Tensor] | None = None) -> StepResult:
        """Gather the call's :class:`StepResult` from the passes that ran."""
        if any(mb.clean is None for mb in self):
            raise RuntimeError("every micro-batch needs a clean pass (forward at offsets None)")
        clean = [mb.clean for mb in self]
        logits = [c.outputs for c in clean]
        out = torch.cat(logits) if len(logits) > 1 else logits[0]
        perturbed = None
        if all(mb.perturbed for mb in self):
            per_batch = []
            for mb in self:
                total = sum(c for _, c in mb.perturbed)
                per_batch.append(weighted_sum([v for v, _ in mb.perturbed],
                                              [c / total for _, c in mb.perturbed]))
            perturbed = self.mean(per_batch)
        kl = self.mean(divergence) if divergence is not None else None
        return StepResult(self.mean([c.loss for c in clean]), out, perturbed, kl)


def weighted_gradient(
    step: Passes, terms_of: Any
) -> StepResult:
    """Accumulate ``sum_j c_j * grad L(w + v_j)`` for each micro-batch's ``terms_of(mb)``.

    ``terms_of(mb)`` returns ``[(c_0, None), (c_1, v_1), ...]``: the clean pass first (it updates
    the statistics and gives the clean loss; with ``c_0 = 0`` it runs without a graph), then the
    perturbed ones. A pass with ``c_j = 0`` runs without a graph. One graph is alive at a time.
    """
    for mb in step:
        terms = list(terms_of(mb))
        if not terms or terms[0][1] is not None:
            raise ValueError("each micro-batch needs a term list starting with the clean pass")
        active = [j for j, (c, _) in enumerate(terms) if c != 0.0]
        last = active[-1] if active else -1
        for j, (c, v) in enumerate(terms):
            p = mb.forward(v, grad=c != 0.0, final=j == last, loss_weight=c)
            if c != 0.0:
                mb.backward(p.loss * c)
    return step.result()
