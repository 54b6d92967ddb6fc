"""Hugging Face ``transformers.Trainer``: any method in ``training_step``, the model's own loss.

::

    from flatminima.integrations.hf import FlatTrainer

    trainer = FlatTrainer(model=model, args=args, train_dataset=ds,
                          flat_method=fm.SAM(rho=0.05))          # was: Trainer(...)
    trainer.train()

``training_step`` runs ``method.backward`` on the Trainer's (possibly DDP-wrapped) model with a
:class:`~flatminima.integrations.ModelLoss` that calls the Trainer's own ``compute_loss`` on the
batch dict, so the model's loss, ``label_smoothing_factor`` and a ``compute_loss_func`` all apply,
at every pass of the method. The rest of the Trainer is left as it is:

* ``gradient_accumulation_steps``: each micro-batch's backwards are scaled by one over the number
  of micro-batches in the window, as the Trainer scales its loss; under DDP the Trainer's
  ``no_sync`` covers all but the window's last micro-batch, whose final pass reduces once.
* ``fp16`` (a ``GradScaler``, CUDA) and ``bf16`` (autocast, also on the CPU): the passes run under
  the Trainer's autocast and every backward through its scaler.
* ``max_grad_norm``, the optimizer, the scheduler: the Trainer unscales, clips and steps on the
  gradient the method left in ``p.grad``.
* Checkpoints carry the method's state (``flatminima.pt`` beside ``optimizer.pt``), restored by
  ``resume_from_checkpoint``; the last :class:`~flatminima.StepResult` is ``self.flat_result``,
  and its perturbed loss and NRS's divergence join the Trainer's logs.

``compute_loss`` is called without ``num_items_in_batch``, so each micro-batch's loss is its own
mean and the window is the mean over micro-batches (the methods' losses must be batch means). For
a token-level loss whose micro-batches hold very different token counts this weights them equally.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from flatminima._nn import ModelLoss
from flatminima.integrations._common import backward_scaler, require
from flatminima.methods import Method, StepResult

transformers = require("transformers", "hf", "Hugging Face transformers")

STATE_FILE = "flatminima.pt"


def _logits(outputs: Any) -> Any:
    """The logits of a model's output (a ``ModelOutput``, a dict or a tuple), or None."""
    if isinstance(outputs, Mapping):
        return outputs.get("logits")
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, (tuple, list)) and len(outputs) > 1:
        logits = outputs[1]  # (loss, logits, ...) as the models return with return_dict=False
    return logits


class FlatTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose training step accumulates ``flat_method``'s gradient.

    Args:
        flat_method: the :class:`flatminima.Method` (any registered one, or ``fm.Every(...)``).
        flat_generator: a ``torch.Generator`` for the random perturbations (saved in
            checkpoints); default: the global RNG.
        *args, **kwargs: as for ``transformers.Trainer``.
    """

    def __init__(self, *args: Any, flat_method: Method,
                 flat_generator: torch.Generator | None = None, **kwargs: Any) -> None:
        if not isinstance(flat_method, Method):
            raise ValueError(f"flat_method must be a flatminima Method, got {flat_method!r}")
        super().__init__(*args, **kwargs)
        if self.args.n_gpu > 1:
            raise ValueError("FlatTrainer does not support torch.nn.DataParallel (n_gpu > 1): "
                             "launch one process per GPU (torchrun) for DistributedDataParallel")
        self.flat_method = flat_method
        self.flat_generator = flat_generator
        self.flat_result: StepResult | None = None

    def _flat_loss(self) -> ModelLoss:
        def run(model: torch.nn.Module, batch: Mapping[str, Any], _: Any) -> Any:
            with self.compute_loss_context_manager():
                # A copy: compute_loss may pop the labels, and every pass needs them.
                loss, outputs = self.compute_loss(model, dict(batch), return_outputs=True)
            logits = _logits(outputs)
            return loss if logits is None else (loss, logits)

        return ModelLoss(run)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        method = self.flat_method
        if "optimizer" in method.declared and method.optimizer is None:
            # MSAM reads the momentum of the optimizer the Trainer steps (never steps it itself).
            method.optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        # The Trainer divides its loss by the window's micro-batches (and accelerate by its own
        # accumulation steps, 1 under the Trainer): every backward of the method is scaled so.
        share = 1.0 / (self.current_gradient_accumulation_steps
                       * self.accelerator.gradient_accumulation_steps)
        result = method.backward(model, inputs, None, self._flat_loss(),
                                 scaler=backward_scaler(self.accelerator.scaler, share),
                                 generator=self.flat_generator)
        self.flat_result = result
        # What the Trainer's own step returns: the loss over the accumulation window's share.
        return result.loss.detach() / self.current_gradient_accumulation_steps

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        result = self.flat_result
        if result is not None and "loss" in logs:  # training logs only
            for key in ("perturbed_loss", "divergence"):
                value = getattr(result, key)
                if value is not None:
                    logs[f"flat_{key}"] = round(float(value), 6)
        super().log(logs, *args, **kwargs)

    # -- checkpoints -----------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            gen = self.flat_generator
            torch.save({"method": self.flat_method.name,
                        "state": self.flat_method.state_dict(),
                        "generator": gen.get_state() if gen is not None else None},
                       os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        saved = torch.load(path, weights_only=True)  # tensors, numbers and strings only
        if saved["method"] != self.flat_method.name:
            raise ValueError(f"the checkpoint was trained with method {saved['method']!r}, this "
                             f"trainer has {self.flat_method.name!r}")
        self.flat_method.load_state_dict(saved["state"])
        if saved["generator"] is not None and self.flat_generator is not None:
            self.flat_generator.set_state(saved["generator"])
