"""PyTorch Lightning: train an existing LightningModule with any method, three lines changed.

::

    from flatminima.integrations.lightning import FlatMinimaModule

    class Net(FlatMinimaModule, L.LightningModule):            # 1. the mixin, first
        def __init__(self):
            super().__init__()
            self.net = ...
            self.flat_method = fm.NRS(rho=0.05)                  # 2. the method
        def forward(self, x):
            return self.net(x)
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.flat_step(x, y)                          # 3. was: loss = ...; return loss

Automatic optimization stays on, so the Trainer's own ``accumulate_grad_batches``,
``gradient_clip_val`` / ``gradient_clip_algorithm``, learning-rate schedulers, precision plugins
(``"bf16-mixed"``; ``"16-mixed"`` needs CUDA, Lightning turns it into bf16 on the CPU) and the
``"ddp"`` strategy all apply, and checkpoints carry the method's state.

How it works. ``flat_step`` runs ``method.backward`` inside ``training_step``, on the module itself:
every pass of the method (under the precision plugin's autocast) and every backward, with the
plugin's ``GradScaler`` when it has one, each backward scaled by ``1 / accumulate_grad_batches``
as Lightning scales the loss it backpropagates. Lightning zeroes the gradients *after*
``training_step`` (at the first batch of each accumulation window), so the call's gradient is
held aside and added to ``p.grad`` in the module's ``backward`` hook, right before Lightning's
own backward of the loss ``flat_step`` returns: its value is the clean loss and its gradient zero
in every trainable parameter. Under DDP that backward is the one the reducer expects in the
iteration (the method's backwards ran inside DDP's forward, before the reducer was prepared, so
nothing was reduced), so the accumulated gradient is all-reduced once, with Lightning's
``no_sync`` during accumulation. The Trainer then unscales, clips and steps as always.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from flatminima.integrations._common import backward_scaler, require
from flatminima.methods import Method, StepResult

require("lightning", "lightning", "PyTorch Lightning")

_KEY = "flatminima"


def sync_loss(module: torch.nn.Module, value: Tensor) -> Tensor:
    """A 0-d tensor equal to ``value`` whose gradient is zero in every trainable parameter of
    ``module`` (each one reached, so DDP's reducer sees all of them)."""
    zero = sum(p.reshape(-1)[:1].sum() for p in module.parameters() if p.requires_grad) * 0.0
    return value.detach().to(torch.float32) + zero


class FlatMinimaModule:
    """A LightningModule mixin: ``self.flat_step(inputs, targets, loss_fn)`` in ``training_step``.

    Set ``self.flat_method`` (a :class:`flatminima.Method`) in ``__init__``, and optionally
    ``self.flat_generator`` (a ``torch.Generator`` for the random perturbations, saved in the
    checkpoints). The last :class:`flatminima.StepResult` is ``self.flat_result`` (its clean
    ``logits`` for metrics). A module that defines ``on_save_checkpoint`` /
    ``on_load_checkpoint`` itself must call ``super()`` in them for the method's state to travel.
    """

    flat_method: Method | None = None
    flat_generator: torch.Generator | None = None
    flat_result: StepResult | None = None

    def flat_step(
        self,
        inputs: Any,
        targets: Any,
        loss_fn: Callable[..., Tensor] = F.cross_entropy,
        *,
        log: bool = True,
        prefix: str = "train",
    ) -> Tensor:
        """Accumulate the method's gradient for this batch and return the loss to return from
        ``training_step`` (the clean loss, zero gradient). ``loss_fn`` as in
        ``Method.backward`` (a :class:`flatminima.integrations.ModelLoss` for a batch the module
        takes whole); with ``log`` the clean loss, the perturbed loss and NRS's divergence are
        logged through ``self.log`` as ``{prefix}/loss``, ``{prefix}/perturbed_loss`` and
        ``{prefix}/divergence``."""
        method = self.flat_method
        if not isinstance(method, Method):
            raise ValueError("set self.flat_method to a flatminima method (e.g. fm.NRS()) in "
                             f"__init__; it is {method!r}")
        trainer = self.trainer  # type: ignore[attr-defined]
        if not self.automatic_optimization:  # type: ignore[attr-defined]
            raise RuntimeError("flat_step needs automatic optimization (the Trainer accumulates, "
                               "clips and steps on the gradient it leaves)")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        factor = 1.0 / trainer.accumulate_grad_batches
        params = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        before = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            result = method.backward(self, inputs, targets, loss_fn,  # type: ignore[arg-type]
                                     scaler=backward_scaler(scaler, factor),
                                     generator=self.flat_generator)
            self._flat_pending = [(p, p.grad) for p in params if p.grad is not None]
        finally:
            for p, g in zip(params, before, strict=True):
                p.grad = g
        self.flat_result = result
        if log:
            self.log(f"{prefix}/loss", result.loss, prog_bar=True)  # type: ignore[attr-defined]
            for key in ("perturbed_loss", "divergence"):
                value = getattr(result, key)
                if value is not None:
                    self.log(f"{prefix}/{key}", value)  # type: ignore[attr-defined]
        return sync_loss(self, result.loss)  # type: ignore[arg-type]

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward hook: first add the gradient ``flat_step`` held aside."""
        pending, self._flat_pending = getattr(self, "_flat_pending", None), None
        for p, g in pending or ():
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        super().backward(loss, *args, **kwargs)  # type: ignore[misc]

    # -- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_save_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        if self.flat_method is not None:
            gen = self.flat_generator
            checkpoint[_KEY] = {
                "method": self.flat_method.name,
                "hparams": self.flat_method.state_dict(),
                "generator": gen.get_state() if gen is not None else None,
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        parent = getattr(super(), "on_load_checkpoint", None)
        if parent is not None:
            parent(checkpoint)
        state = checkpoint.get(_KEY)
        if state is None or self.flat_method is None:
            return
        if state["method"] != self.flat_method.name:
            raise ValueError(f"the checkpoint was trained with method {state['method']!r}, this "
                             f"module has {self.flat_method.name!r}")
        self.flat_method.load_state_dict(state["hparams"])
        if state["generator"] is not None and self.flat_generator is not None:
            self.flat_generator.set_state(state["generator"])
            _spread_over_ranks(self.flat_generator)


def _spread_over_ranks(generator: torch.Generator) -> None:
    """Rank 0 wrote the checkpoint, so every rank now holds its generator state: derive one
    stream per rank from it (each rank draws its own perturbation, as before the restart)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    generator.manual_seed(seed + dist.get_rank())
