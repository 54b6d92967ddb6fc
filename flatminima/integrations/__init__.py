"""Thin adapters between the methods and the training frameworks.

* :class:`FlatOptimizer` (``flatminima.integrations.optim``, no extra): any ``torch.optim``
  optimizer and a method behind ``step(closure)`` and SAM's ``first_step`` / ``second_step``.
* :class:`ModelLoss`: a ``loss_fn`` that runs the model itself (a batch dict, the model's own
  loss), the piece every adapter below passes to ``Method.backward``.
* ``flatminima.integrations.lightning`` (extra ``lightning``): a LightningModule mixin.
* ``flatminima.integrations.hf`` (extra ``hf``): a ``transformers.Trainer`` subclass.
* ``flatminima.integrations.peft`` (extra ``peft``): parameter selections for LoRA adapters and
  Flat-LoRA's perturbation of the merged weights.

Each framework module imports its framework when imported, and fails with a one-line
``ImportError`` naming the extra when it is missing; this package imports none of them.
"""

from __future__ import annotations

from flatminima._nn import ModelLoss
from flatminima.integrations.optim import FlatOptimizer

__all__ = ["FlatOptimizer", "ModelLoss"]
