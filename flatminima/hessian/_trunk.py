"""Skip the frozen part of the network: evaluate only the module that owns the selected weights.

When the measured parameters all live in one submodule ``M`` (the classifier for
``params="last_layer"``) and the model's output *is* ``M``'s output, the objective factors as

    L(w) = sum_b (n_b / N) * loss_fn(M(w; a_b), y_b),     a_b = the inputs ``M`` receives,

and the ``a_b`` do not depend on ``w``. They are computed by one forward pass per batch, kept, and
every Hessian (or GGN) product then runs through ``M`` alone: for a last layer that replaces a
forward and backward through the whole network by one through a single ``nn.Linear``. The
curvature is the same operator, not an approximation.

The factorisation is checked, not assumed. Of the modules that contain every selected parameter
(``head.0`` and ``head`` for ``head.0.weight``) the deepest one that passes these checks is used,
and :func:`capture_trunk` returns ``None`` (the caller then evaluates the whole model) if none
does. On a forward pass in which only the selected parameters require gradients:

* ``M`` is called exactly once per forward (a module applied twice is not a cut of the graph);
* the object the model returns is the object ``M`` returned (no post-processing after ``M``);
* no tensor that ``M`` receives requires a gradient, i.e. nothing upstream of ``M`` uses a
  selected parameter (tied weights, a parameter read by a skip connection);
* every argument of ``M`` is a tensor or a plain constant, and all kept inputs fit ``budget``
  bytes;
* the model is in eval mode: in train mode a dropout mask drawn once would be reused by every
  product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from flatminima._params import Batch

_CONSTANTS = (int, float, bool, str, type(None))


@dataclass
class Trunk:
    """The module ``M`` owning the selected parameters and the inputs it receives per batch."""

    prefix: str                                   # M's name in the model, e.g. "fc"
    module: nn.Module
    fixed: dict[str, Tensor]                      # M's unselected parameters, local names
    inputs: list[tuple[tuple, dict]]              # (args, kwargs) M received, per batch
    nbytes: int

    def local(self, name: str) -> str:
        return name[len(self.prefix) + 1 :]

    def outputs(self, params: dict[str, Tensor], i: int) -> Tensor:
        """``M(params; a_i)``: ``params`` keyed by the model's parameter names."""
        args, kwargs = self.inputs[i]
        local = {self.local(n): t for n, t in params.items()}
        return functional_call(self.module, {**self.fixed, **local}, args, kwargs)


def owning_modules(model: nn.Module, names: list[str]) -> list[tuple[str, nn.Module]]:
    """Proper submodules whose parameters include every name in ``names``, deepest first."""
    modules = dict(model.named_modules())
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if any(p != level[0] for p in level):
            break
        common.append(level[0])
    prefixes = [".".join(common[:i]) for i in range(len(common), 0, -1)]
    return [(p, modules[p]) for p in prefixes if p in modules]


def _tensors(args: tuple, kwargs: dict) -> list[Tensor] | None:
    out = []
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            out.append(value)
        elif not isinstance(value, _CONSTANTS):
            return None
    return out


def capture_trunk(
    model: nn.Module,
    params: dict[str, Tensor],
    fixed: dict[str, Tensor],
    batches: list[Batch],
    budget: int,
) -> Trunk | None:
    """Run the trunk once per batch and keep ``M``'s inputs, or ``None`` if that is not exact.

    ``params`` are the selected parameters (detached), ``fixed`` every other parameter.
    """
    if model.training:
        return None
    candidates = owning_modules(model, list(params))
    if not candidates:
        return None
    seen: dict[str, list[tuple[tuple, dict, object]]] = {p: [] for p, _ in candidates}

    def hook_for(prefix: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
            seen[prefix].append((args, kwargs, output))
        return hook

    handles = [m.register_forward_hook(hook_for(p), with_kwargs=True) for p, m in candidates]
    chosen: tuple[str, nn.Module] | None = None
    inputs: list[tuple[tuple, dict]] = []
    nbytes = 0
    try:
        for i, (x, _y) in enumerate(batches):
            for calls in seen.values():
                calls.clear()
            if i == 0:
                # Only the selected parameters require gradients: any input of M that does is
                # computed from them.
                probe = {n: p.detach().requires_grad_(True) for n, p in params.items()}
                with torch.enable_grad():
                    out = functional_call(model, {**fixed, **probe}, (x,))
                chosen = next(((p, m) for p, m in candidates if _is_cut(seen[p], out)), None)
                if chosen is None:
                    return None
            else:
                with torch.no_grad():
                    out = functional_call(model, {**fixed, **params}, (x,))
                if not _is_cut(seen[chosen[0]], out, check_grad=False):
                    return None
            args, kwargs, _ = seen[chosen[0]][0]
            nbytes += sum(t.numel() * t.element_size() for t in _tensors(args, kwargs) or [])
            if nbytes > budget:
                return None
            detach = lambda v: v.detach() if isinstance(v, Tensor) else v  # noqa: E731
            inputs.append((tuple(detach(a) for a in args),
                           {k: detach(v) for k, v in kwargs.items()}))
    finally:
        for h in handles:
            h.remove()
    prefix, module = chosen
    local_fixed = {
        n[len(prefix) + 1 :]: t for n, t in fixed.items() if n.startswith(prefix + ".")
    }
    return Trunk(prefix, module, local_fixed, inputs, nbytes)


def _is_cut(calls: list[tuple[tuple, dict, object]], out: object, check_grad: bool = True
            ) -> bool:
    """One call, whose output is the model's output, on inputs that do not need the weights."""
    if len(calls) != 1 or calls[0][2] is not out:
        return False
    tensors = _tensors(calls[0][0], calls[0][1])
    return tensors is not None and not (check_grad and any(t.requires_grad for t in tensors))
