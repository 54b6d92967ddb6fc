"""Curvature during training: ``curvature_every=N`` measures after every N-th epoch and after
the last.

Each measurement is on the same fixed subset of the training split: ``curvature_examples``
examples drawn without replacement by ``torch.randperm`` from a generator seeded with
``data_seed`` (kept in their order in the training set; normalized as in training, never
augmented), as one batch, in eval mode, with the run's loss (label smoothing included). It adds
to the epoch's metrics row

* ``hessian_top``: the top Hessian eigenvalue (``fm.hessian.eigenvalues``, ``k=1``);
* ``hessian_trace`` (``curvature_trace=true``): the trace (``fm.hessian.trace``, Krylov-deflated
  Hutchinson with :data:`TRACE_MATVECS` products);
* ``hessian_top_last_layer`` (``curvature_last_layer=true``): the top eigenvalue over the last
  layer's parameters (``params="last_layer"``).

Every estimate draws its random vectors from a fresh ``torch.Generator`` seeded with ``seed``, so
:func:`measure` on a saved model gives the same numbers. Epochs without a measurement have no
such keys (an empty cell in ``metrics.csv``, no TensorBoard point).

A measurement leaves training exactly as it was: the model's mode and buffers are restored by the
estimators, nothing is written to ``.grad``, and the global random states (CPU and CUDA) are
saved before and restored after, so a run ends with bitwise the same weights with or without it.
The schedule depends only on the epoch number, so a resumed run continues it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.experiment.config import Config

TRACE_MATVECS = 60  # as ``flatminima measure``'s default


def curvature_batch(cfg: Config, d: Mapping[str, Any], device: str | torch.device = "cpu"
                    ) -> tuple[Tensor, Tensor]:
    """The fixed measurement batch of a run (``d`` as :func:`~flatminima.experiment.train.
    build_data` returns it)."""
    from flatminima.data import DeviceLoader

    x, y = d["train"]
    n = min(cfg.curvature_examples, len(y))
    g = torch.Generator().manual_seed(cfg.data_seed)
    idx = torch.randperm(len(y), generator=g)[:n].sort().values
    data = d["data"]
    loader = DeviceLoader(x[idx], y[idx], n, shuffle=False, device=device, mean=data.mean,
                          std=data.std)
    return next(iter(loader))


def measure(cfg: Config, model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, float]:
    """The curvature values ``cfg`` asks for, of ``model`` on ``batch`` (see the module doc)."""
    from flatminima import hessian
    from flatminima.experiment.train import loss_function

    loss_fn = loss_function(cfg)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(cfg.seed)

    out = {"hessian_top": float(hessian.eigenvalues(model, loss_fn, batch, k=1,
                                                    generator=gen())[0])}
    if cfg.curvature_trace:
        out["hessian_trace"] = float(hessian.trace(model, loss_fn, batch,
                                                   num_matvecs=TRACE_MATVECS, generator=gen()))
    if cfg.curvature_last_layer:
        out["hessian_top_last_layer"] = float(hessian.eigenvalues(
            model, loss_fn, batch, k=1, params="last_layer", generator=gen())[0])
    return out


class CurvatureProbe:
    """The measurements of one run: :meth:`due` after which epochs, :meth:`measure` them."""

    def __init__(self, cfg: Config, d: Mapping[str, Any], device: torch.device) -> None:
        self.cfg = cfg
        self._d = d
        self._device = torch.device(device)
        self._batch: tuple[Tensor, Tensor] | None = None

    def due(self, epoch: int) -> bool:
        """Whether to measure after ``epoch`` (1-based)."""
        every = self.cfg.curvature_every
        return every > 0 and (epoch % every == 0 or epoch == self.cfg.epochs)

    def measure(self, model: nn.Module) -> dict[str, float]:
        devices = ([self._device.index or 0] if self._device.type == "cuda" else [])
        with torch.random.fork_rng(devices=devices):
            if self._batch is None:
                self._batch = curvature_batch(self.cfg, self._d, self._device)
            return measure(self.cfg, model, self._batch)
