"""LoRA with PEFT: perturb the adapters only, or the merged full weights (Flat-LoRA).

Two selections, one for each reading of "a flat LoRA":

* :func:`adapter_params` (``params=`` of any method): the perturbation acts on the trainable
  adapter tensors (``lora_A``, ``lora_B``, the DoRA magnitude, ...) and on nothing else, a
  trainable classification head (``modules_to_save``) included. ``fm.SAM(params=
  adapter_params(model))`` is SAM in the adapters' own space (LoRA-SAM).
* :class:`FlatLoRA` (Li et al., "Flat-LoRA: Low-Rank Adaptation over a Flat Loss Landscape",
  ICML 2025): the flatness that matters is that of the *merged* weight ``W' = W + s B A`` in the
  full parameter space, of which the adapters see only a low-rank slice. Its objective is
  ``E_eps L(W + s B A + eps)``, ``eps`` Gaussian in the full space of every LoRA layer, each row
  ``i`` (output unit) with standard deviation ``sigma ||W'_i|| / sqrt(n)``, ``n`` the layer's
  fan-in: the noise is scaled to each filter of the merged weight, as RWP's. It is added to the
  frozen base weight ``W`` for one pass (``torch.func``; nothing is moved), and only the adapters
  (and whatever else trains) receive the gradient. One pass with a graph per step, plus the
  clean pass without a graph every method runs for the statistics and the reported loss.

``sigma`` is an attribute: the paper raises it over training (``sigma_t = sigma (1 - cos(pi t /
T)) / 2``); set ``method.sigma`` from the training loop to do the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from flatminima._checks import check_callable, check_nonneg
from flatminima.integrations._common import require
from flatminima.methods import Method, Passes, StepResult, argument, hparam, weighted_gradient

peft = require("peft", "peft", "PEFT")
from peft.tuners.lora import LoraLayer  # noqa: E402

MergedNoise = Callable[[Mapping[str, Tensor], "torch.Generator | None"], dict[str, Tensor]]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """The model's LoRA layers by module name (``base_model.model.encoder...``)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and isinstance(getattr(m, "base_layer", None), nn.Module)}


def adapter_params(model: nn.Module) -> list[str]:
    """Names of the trainable adapter tensors of every PEFT layer: a ``params=`` selection that
    perturbs the adapters and nothing else (a trainable head is left out)."""
    names = []
    for prefix, module in model.named_modules():
        if not isinstance(module, peft.tuners.tuners_utils.BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            for name, p in getattr(module, attr).named_parameters():
                if p.requires_grad:
                    names.append(f"{prefix}.{attr}.{name}")
    if not names:
        raise ValueError("the model has no trainable PEFT adapter parameters")
    return names


def merged_weights(model: nn.Module, layers: Any = None) -> dict[str, Tensor]:
    """``{name of the base weight: W + s B A}`` for the selected LoRA layers, detached.

    ``layers``: None (every LoRA layer), a list of module names, or a predicate on the module
    name. A layer whose adapters are merged into ``W`` already gives ``W``.
    """
    found = lora_layers(model)
    if layers is None:
        chosen = found
    elif callable(layers):
        chosen = {n: m for n, m in found.items() if layers(n)}
    else:
        unknown = [n for n in layers if n not in found]
        if unknown:
            raise ValueError(f"no LoRA layer named {unknown[0]!r} (LoRA layers: "
                             f"{', '.join(found) or 'none'})")
        chosen = {n: found[n] for n in layers}
    if not chosen:
        raise ValueError("no LoRA layer selected: the model has none, or layers= matches none")
    out = {}
    with torch.no_grad():
        for name, layer in chosen.items():
            w = layer.base_layer.weight.detach()
            merged = w.clone()
            if not layer.merged:
                for adapter in layer.active_adapters:
                    if adapter in getattr(layer, "lora_A", {}):
                        merged += layer.get_delta_weight(adapter).to(w.dtype)
            out[f"{name}.base_layer.weight"] = merged
    return out


def filter_gaussian(sigma: float) -> MergedNoise:
    """Flat-LoRA's noise: each row ``i`` of a merged weight ``W'`` gets ``N(0, sigma^2
    ||W'_i||^2 / n)`` entries, ``n`` the row's length (the fan-in)."""

    def draw(merged: Mapping[str, Tensor], generator: torch.Generator | None) -> dict[str, Tensor]:
        out = {}
        for name, w in merged.items():
            rows = w.reshape(w.shape[0], -1)
            std = sigma * rows.norm(dim=1, keepdim=True) / math.sqrt(rows.shape[1])
            noise = torch.randn(rows.shape, generator=generator, dtype=w.dtype,
                                device=generator.device if generator is not None else w.device)
            out[name] = (noise.to(w.device) * std).reshape(w.shape)
        return out

    return draw


def _check_layers(value: Any, name: str) -> Any:
    if value is None or callable(value):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{name} must be None, a list of LoRA module names or a predicate on the "
                     f"name, got {value!r}")


def _check_unused(value: Any, name: str) -> None:
    if value is not None:
        raise ValueError("FlatLoRA takes layers=, not params=: it perturbs the merged weights "
                         "of LoRA layers (frozen), not trainable parameters")
    return None


class FlatLoRA(Method):
    """``grad_adapters L(W + s B A + eps)``, ``eps`` Gaussian in the merged weights' full space.

    Flat-LoRA (Li et al. 2025), see the module docstring. Not registered (it needs a PEFT model);
    it is a gradient estimator like every method, so it works under ``train``-style loops, the
    closure optimizer, Lightning and the Hugging Face Trainer.

    Example::

        method = FlatLoRA(sigma=0.05)
        method.backward(peft_model, x, y); opt.step(); opt.zero_grad()
    """

    name = "flat_lora"
    sigma = hparam(0.05, check_nonneg, "noise scale relative to each row of W + sBA, >= 0 "
                   "(paper: 0.05, raised over training).")
    layers = argument(None, _check_layers, "the LoRA layers perturbed: None (all), module names "
                      "or a predicate on the name.")
    noise = argument(None, lambda v, n: check_callable(v, n, optional=True),
                     "a sampler (merged weights by name, generator) -> {name: eps}; overrides "
                     "the default Gaussian.")
    params = argument(None, _check_unused, "not used: layers= selects the LoRA layers.")

    def _backward(self, step: Passes, generator: torch.Generator | None) -> StepResult:
        merged = merged_weights(step.model, self.layers)
        noise = self.noise if self.noise is not None else filter_gaussian(float(self.sigma))
        eps = noise(merged, generator)
        if set(eps) != set(merged):
            raise ValueError(f"the noise sampler must return one tensor for each of "
                             f"{sorted(merged)}, got {sorted(eps)}")
        offsets = {n: eps[n].detach().to(dtype=w.dtype, device=w.device)
                   for n, w in merged.items()}
        return weighted_gradient(step, lambda mb: [(0.0, None), (1.0, offsets)])
