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
import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatminima._nn import (
    LossFn,
    MissingOutputs,
    ModelLoss,
    frozen_norm_stats,
    is_fully_sharded,
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


class _Call(nn.Module):
    """Holds a model so that ``functional_call`` can run any code on it, not only its forward."""

    def __init__(self, model: nn.Module, fn: Any) -> None:
        super().__init__()
        self.model = model
        self._fn = fn

    def forward(self) -> Any:
        return self._fn(self.model)


def evaluate(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn,
             offsets: Offsets = None) -> tuple[Any, Tensor]:
    """``(outputs, loss)`` of one pass at ``w + offsets``: ``loss_fn(primary_output(f(x)), y)``,
    or what a :class:`~flatminima._nn.ModelLoss` returns, run with the moved parameters."""
    if not isinstance(loss_fn, ModelLoss):
        outputs = primary_output(forward_at(model, inputs, offsets))
        return outputs, loss_fn(outputs, targets)
    if not offsets:
        return loss_fn.run(model, inputs, targets)
    params = dict(model.named_parameters())
    moved = {"model." + n: params[n] + v for n, v in offsets.items()}
    holder = _Call(model, lambda m: loss_fn.run(m, inputs, targets))
    return functional_call(holder, moved, (), strict=False)


SHARDED = ("the model is sharded with FSDP2 (fully_shard), whose forward gathers its own "
           "parameters, so a pass at perturbed weights would silently run at w: flatminima's "
           "methods other than Baseline need an unsharded model (DistributedDataParallel)")


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
        # The clean loss of this micro-batch's first clean pass with a graph, so that
        # ``gradient`` can tell a clean gradient (see ``Passes.record_clean_gradients``). A weak
        # reference: holding it must not keep a graph the method has let go of.
        self._clean_loss: weakref.ref[Tensor] | None = None

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
        stats: bool | None = None,
    ) -> Pass:
        """The model's outputs and loss at ``w + offsets`` (``None``: at ``w``) on this batch.

        ``grad=False`` runs without a graph (a clean pass that only reports the loss and updates
        the statistics). ``final=True`` marks the last forward of this micro-batch whose graph
        reaches ``p.grad``; on the last micro-batch it is the one DDP synchronizes on.
        ``loss_weight`` is the pass's weight in the reported perturbed loss (``0``: not
        reported). The first clean pass of a micro-batch gives its clean loss and logits.
        ``stats`` says whether this pass updates the normalization statistics; by default only
        a clean pass does (``stats=True`` at ``w + v``: a method whose single pass is perturbed,
        as MSAM's, so that the statistics are still updated once per call).
        """
        step = self.step
        grad = grad and torch.is_grad_enabled()
        synced = final and self.is_last
        if step.synced and grad:
            raise RuntimeError("a forward pass with a graph after the final one: DDP would "
                               "reduce the gradient before this pass reaches it")
        self._replay_rng()
        if offsets and step.sharded:
            raise NotImplementedError(SHARDED)
        ddp = step.model.no_sync() if step.ddp and not synced else contextlib.nullcontext()
        update = not offsets if stats is None else stats
        frozen = contextlib.nullcontext() if update else frozen_norm_stats(step.norm_layers)
        with ddp, frozen, torch.set_grad_enabled(grad):
            outputs, loss = evaluate(step.model, self.inputs, self.targets, step.loss_fn,
                                     offsets)
        step.synced = step.synced or (synced and grad)
        result = Pass(outputs, loss)
        if not offsets:
            if self.clean is None:
                self.clean = Pass(outputs.detach(), loss.detach())
            if grad and self._clean_loss is None:
                self._clean_loss = weakref.ref(loss)
        elif loss_weight:
            self.perturbed.append((loss.detach(), float(loss_weight)))
        return result

    def _replay_rng(self) -> None:
        """Record the global RNGs before this micro-batch's first pass; replay them before any
        later one."""
        if self._rng is None:
            self._rng = RngReplay(self.step.device)
        else:
            self._rng.restore()

    def backward(self, objective: Tensor) -> None:
        """Accumulate ``d/dw [weight * objective]`` into ``p.grad`` (scaled by the scaler)."""
        scaled = objective * self.weight
        scaler = self.step.scaler
        (scaler.scale(scaled) if scaler is not None else scaled).backward()

    def gradient(
        self, objective: Tensor, tensors: Sequence[Tensor], *, retain_graph: bool = False
    ) -> list[Tensor | None]:
        """``d/dt [weight * objective]`` for each of ``tensors``, unscaled, ``p.grad`` untouched.

        The backward runs scaled when a scaler is given (so float16 gradients do not underflow)
        and the result is divided by the scale; ``None`` where a tensor is unused.
        ``retain_graph=True`` keeps the graph for a later :meth:`backward` of the same pass (a
        method whose last coefficient depends on this gradient, as GSAM's does).
        """
        if self.step.sharded:  # FSDP2's sharded parameters get their gradients from hooks
            raise NotImplementedError(SHARDED)
        scaler = self.step.scaler
        scaled = objective * self.weight
        if scaler is not None:
            scaled = scaler.scale(scaled)
        grads = torch.autograd.grad(scaled, list(tensors), allow_unused=True,
                                    retain_graph=retain_graph)
        if scaler is None:
            out = list(grads)
        else:
            inv = 1.0 / float(scaler.get_scale())
            out = [g * inv if g is not None else None for g in grads]
        record = self.step._clean_grads
        if record is not None and self._clean_loss is not None and objective is self._clean_loss():
            for t, g in zip(tensors, out, strict=True):
                if g is not None:
                    hit = record.setdefault(id(t), (t, torch.zeros_like(g), set()))
                    if self.index not in hit[2]:
                        hit[1].add_(g)
                        hit[2].add(self.index)
        return out


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
        self.sharded = is_fully_sharded(model)
        self.synced = False
        self._clean_grads: dict[int, tuple[Tensor, Tensor, set[int]]] | None = None
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

    def record_clean_gradients(self) -> None:
        """Keep, from now on, the clean gradients the method computes on its way (each
        :meth:`MicroBatch.gradient` of a micro-batch's clean loss), for :meth:`clean_gradient`.

        Off by default: it holds one more gradient-sized sum for the whole call.
        """
        self._clean_grads = {}

    def clean_gradient(self, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The full-batch ``grad L(w)`` of ``params``, unscaled, ``p.grad`` untouched.

        Where the method already computed it for every micro-batch (recorded, see
        :meth:`record_clean_gradients`; SAM's first sweep) it costs nothing. Otherwise one more
        pass per micro-batch at ``w`` computes the rest: its dropout masks replayed, the
        statistics left alone, under ``no_sync`` (it reads gradients with ``autograd.grad``,
        which DDP does not reduce), so it may run after the call's final pass. Each rank's own
        gradient under DDP.
        """
        record = self._clean_grads or {}
        every = set(range(len(self.micro_batches)))
        out: dict[str, Tensor] = {}
        missing: dict[str, Tensor] = {}
        for name, p in params.items():
            hit = record.get(id(p))
            if hit is not None and hit[0] is p and hit[2] == every:
                out[name] = hit[1]
            else:
                missing[name] = p
        if not missing:
            return out
        tensors = list(missing.values())
        sums = [torch.zeros_like(p) for p in tensors]
        for mb in self:
            mb._replay_rng()
            ddp = self.model.no_sync() if self.ddp else contextlib.nullcontext()
            with ddp, frozen_norm_stats(self.norm_layers), torch.enable_grad():
                _, loss = evaluate(self.model, mb.inputs, mb.targets, self.loss_fn)
            for s, g in zip(sums, mb.gradient(loss, tensors), strict=True):
                if g is not None:
                    s.add_(g)
        out.update(zip(missing, sums, strict=True))
        return out

    def result(self, divergence: Sequence[Tensor] | None = None) -> StepResult:
        """Gather the call's :class:`StepResult` from the passes that ran."""
        if any(mb.clean is None for mb in self):
            raise RuntimeError("every micro-batch needs a clean pass (forward at offsets None)")
        clean = [mb.clean for mb in self]
        logits = [c.outputs for c in clean]
        if any(isinstance(o, MissingOutputs) for o in logits):
            out = None  # a ModelLoss that returned the loss alone
        else:
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
