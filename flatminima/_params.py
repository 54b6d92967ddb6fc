"""Private plumbing shared by the measurements: parameter subsets, flat vectors, data batches.

The measurements (``hessian``, ``divergence``, ``landscape``, ``volume``) all see the model as a
function of one flat vector ``w`` of the selected parameters, with every other parameter and
buffer held fixed. This module turns a model plus a selection into that view:

* :func:`select_params` resolves ``params=`` (``None``, a list of names, a predicate, or one of
  ``"last_layer"``, ``"weights"``, ``"no_norm"``) into an ordered ``{name: Parameter}`` dict.
  The methods (which parameters are perturbed) and the measurements (which are measured) share
  it, so one vocabulary selects parameters everywhere; :func:`freeze_selection` turns a one-shot
  iterator of names into a tuple when a method is built, so every call sees the same names.
* :class:`FlatParams` flattens/unflattens between that dict and one vector.
* :func:`as_batches` turns ``data`` (one ``(x, y)`` batch or an iterable of them) into a list.
* :func:`measuring_mode` puts the model in eval (or train) mode and restores mode and buffers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flatminima._nn import model_device, norm_param_names

Batch = tuple[Tensor, Tensor]
ParamSpec = Iterable[str] | Callable[..., bool] | str | None
SELECTIONS = ("last_layer", "weights", "no_norm")

__all__ = ["Batch", "FlatParams", "ParamSpec", "SELECTIONS", "as_batches", "batch_weights",
           "freeze_selection", "last_layer_names", "measuring_mode", "model_device",
           "select_params"]


def _own_params(module: nn.Module) -> list[Tensor]:
    """The parameters a layer owns: its direct ones and, for a parametrized layer
    (``torch.nn.utils.parametrize``), the originals kept in its ``parametrizations`` child."""
    own = list(module.parameters(recurse=False))
    parametrizations = getattr(module, "parametrizations", None)
    if isinstance(parametrizations, nn.ModuleDict):
        own += list(parametrizations.parameters())
    return own


def _leaf_modules_with_params(model: nn.Module) -> list[tuple[str, nn.Module]]:
    inside_parametrizations = {
        id(m) for owner in model.modules()
        if isinstance(getattr(owner, "parametrizations", None), nn.ModuleDict)
        for m in owner.parametrizations.modules()
    }
    return [
        (name, m)
        for name, m in model.named_modules()
        if id(m) not in inside_parametrizations
        and any(p.requires_grad for p in _own_params(m))
    ]


def last_layer_names(model: nn.Module, example_input: Tensor | None = None) -> list[str]:
    """Names of the parameters of the model's last layer.

    The last layer is the last module owning trainable parameters *in execution order* when an
    example input is given (found with forward hooks, so a head registered before the body is
    still found), else in registration order. For the CIFAR ResNets, WRN and ViT this is the
    final classifier ``nn.Linear`` (the NRS paper's Table 3 measures exactly this layer).
    """
    owners = _leaf_modules_with_params(model)
    if not owners:
        raise ValueError("model has no trainable parameters, so it has no last layer")
    last_name = owners[-1][0]
    if example_input is not None:
        order: list[str] = []
        handles = [
            m.register_forward_hook(lambda _m, _i, _o, n=name: order.append(n))
            for name, m in owners
        ]
        try:
            # Eval mode: finding the layer must not move BatchNorm statistics. Two samples suffice.
            with torch.no_grad(), measuring_mode(model, train=False):
                model(example_input[:2])
        finally:
            for h in handles:
                h.remove()
        if order:
            last_name = order[-1]
    module = dict(model.named_modules())[last_name]
    # The model's own names for them: a weight tied to an earlier layer is listed once by
    # model.named_parameters(), under the earlier layer's name.
    owned = {id(p) for p in _own_params(module) if p.requires_grad}
    return [n for n, p in model.named_parameters() if id(p) in owned]


def freeze_selection(params: ParamSpec) -> ParamSpec:
    """``params`` in a form that can be resolved any number of times.

    An iterable of names (a generator, ``iter([...])``, a set) becomes a tuple, read once; a
    string, a predicate or ``None`` is returned as it is. A string outside :data:`SELECTIONS` or
    a value of another type is a ``ValueError``.
    """
    if params is None or callable(params):
        return params
    if isinstance(params, str):
        if params not in SELECTIONS:
            raise ValueError(f"unknown parameter selection {params!r}; use "
                             f"{', '.join(repr(s) for s in SELECTIONS)}, a list of names or a "
                             "predicate")
        return params
    if isinstance(params, Iterable):
        names = tuple(params)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise ValueError(f"params must list parameter names, got {bad[0]!r}")
        return names
    raise ValueError(f"params must be None, a list of names, a predicate, 'last_layer', "
                     f"'weights' or 'no_norm', got {params!r}")


def select_params(
    model: nn.Module, params: ParamSpec = None, example_input: Tensor | None = None
) -> dict[str, nn.Parameter]:
    """Resolve a parameter selection into an ordered ``{name: Parameter}`` dict.

    ``params`` is ``None`` (every trainable parameter), a list of names, a predicate taking the
    name (or ``(name, tensor)``), ``"last_layer"`` (see :func:`last_layer_names`), ``"weights"``
    (tensors with ``dim > 1``: no biases, no norm scales) or ``"no_norm"`` (all but
    normalization-layer parameters, :func:`flatminima._nn.is_norm_layer`). Only parameters with
    ``requires_grad`` are selected, in the model's order (a flat vector over the selection is
    laid out as ``model.named_parameters()`` lists them, whatever order the names came in). An
    empty result or an unknown name raises ``ValueError``.
    """
    params = freeze_selection(params)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params is None:
        selected = trainable
    elif params == "last_layer":
        names = set(last_layer_names(model, example_input))
        selected = {n: p for n, p in trainable.items() if n in names}
    elif params == "weights":
        selected = {n: p for n, p in trainable.items() if p.dim() > 1}
    elif params == "no_norm":
        norm = norm_param_names(model)
        selected = {n: p for n, p in trainable.items() if n not in norm}
    elif callable(params):
        if _arity(params) == 1:
            selected = {n: p for n, p in trainable.items() if params(n)}
        else:
            selected = {n: p for n, p in trainable.items() if params(n, p)}
    else:
        missing = [n for n in params if n not in trainable]
        if missing:
            raise ValueError(f"model has no trainable parameter named {missing[0]!r}")
        wanted = set(params)
        selected = {n: p for n, p in trainable.items() if n in wanted}
    if not selected:
        raise ValueError(f"parameter selection {params!r} matches no trainable parameter")
    return selected


def _arity(fn: Callable[..., bool]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return 1 if len(positional) == 1 else 2


@dataclass(frozen=True)
class FlatParams:
    """The bijection between a ``{name: tensor}`` dict and one flat vector (in dict order)."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, params: Mapping[str, Tensor]) -> FlatParams:
        names = tuple(params)
        shapes = tuple(params[n].shape for n in names)
        return cls(names, shapes, tuple(int(s.numel()) for s in shapes))

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``tensors[name]`` in order into one vector."""
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of ``flat`` (shape ``(..., size)``) reshaped to each parameter's shape.

        Leading batch dimensions are kept, so a ``(P, size)`` stack of weight sets becomes
        ``{name: (P, *shape)}``, ready for ``torch.func.vmap``.
        """
        lead = flat.shape[:-1]
        # One split, not a slice per parameter: differentiated, a slice's backward writes its
        # piece into a zero-filled vector of the full size, so p parameters cost p fills and p
        # additions of all n entries (a third of a Hessian-vector product on ResNet-18); a
        # split's backward is one concatenation.
        pieces = flat.split(self.numels, dim=-1)
        # A tuple, not unpacked: a 0-dim parameter of one weight set has the empty shape ().
        return {n: piece.reshape((*lead, *shape))
                for n, shape, piece in zip(self.names, self.shapes, pieces, strict=True)}


def as_batches(data: object, device: torch.device | None = None) -> list[Batch]:
    """``data`` as a non-empty list of ``(x, y)`` batches on ``device``.

    ``data`` is one batch (a 2-tuple/list of tensors) or an iterable of batches (a list, a
    ``DataLoader``, a generator). Iterables are materialized once, because every matvec of a
    Lanczos or Hutchinson run must see the same batches.
    """
    if _is_batch(data):
        batches = [data]
    elif isinstance(data, Iterable):
        batches = list(data)
    else:
        raise ValueError(f"data must be an (inputs, targets) batch or an iterable of them, "
                         f"got {type(data).__name__}")
    if not batches:
        raise ValueError("data is empty: need at least one (inputs, targets) batch")
    out: list[Batch] = []
    for i, b in enumerate(batches):
        if not _is_batch(b):
            raise ValueError(f"batch {i} of data is not an (inputs, targets) pair of tensors")
        x, y = b[0], b[1]
        if len(x) == 0:
            raise ValueError(f"batch {i} of data is empty")
        if len(x) != len(y):
            raise ValueError(f"batch {i} has {len(x)} inputs but {len(y)} targets")
        if device is not None:
            x, y = x.to(device), y.to(device)
        out.append((x, y))
    return out


def _is_batch(obj: object) -> bool:
    return (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and isinstance(obj[0], Tensor)
        and isinstance(obj[1], Tensor)
    )


def batch_weights(batches: Sequence[Batch]) -> list[float]:
    """``n_b / N`` for each batch: the weights of the size-weighted mean loss."""
    sizes = [len(x) for x, _ in batches]
    total = float(sum(sizes))
    return [s / total for s in sizes]


@contextlib.contextmanager
def measuring_mode(model: nn.Module, train: bool = False) -> Iterator[None]:
    """Put ``model`` in eval (default) or train mode; restore the mode and all buffers after.

    In train mode BatchNorm updates its running statistics on every forward, and a custom
    module may update a buffer in eval mode too (a running average); a measurement must not
    change the model, so the buffers are copied and written back in either mode.
    """
    modes = {m: m.training for m in model.modules()}
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.train(train)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        if saved:
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
