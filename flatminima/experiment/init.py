"""Initialization from saved weights before training (fine-tuning): ``init_from=PATH``.

``PATH`` is one of

* a file written by ``torch.save(model.state_dict())`` (torchvision / timm format: a plain dict
  of tensors, possibly under a ``state_dict`` or ``model`` key, possibly with DDP's ``module.``
  prefix);
* a flatminima checkpoint (``last.pt``: the weights are its ``model`` entry);
* a flatminima run folder (its ``last.pt``).

Everything is read with ``torch.load(..., weights_only=True)``: nothing is unpickled. A
torchvision ResNet state_dict (``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``, ``fc.weight``) is renamed onto this library's ResNets
(``stem.0``, ``stem.1``, ``stages.0.0.conv1``, ``stages.1.0.shortcut.0``, ``head``), which match
it parameter for parameter (v1.5 Bottleneck, stride on the 3x3; ``resnet18`` needs
``model.stem=imagenet`` for torchvision's 7x7 stem and max-pool).

The classifier head (the model's last layer, :func:`flatminima._params.last_layer_names`) follows
``init_head``: ``keep`` loads it (its shape must match), ``reset`` keeps the new model's freshly
initialized head, ``auto`` (default) keeps it when its shapes match and resets it otherwise (a
different number of classes). Every other tensor of the model (parameters and buffers) must be in
the file and every tensor of the file in the model, or the first one that is not is named in a
one-line :class:`~flatminima.experiment.config.ConfigError`; ``init_strict=false`` loads what
matches by name and keeps the fresh values of the rest. A shape mismatch outside the head is
always an error (a different architecture). BatchNorm's ``num_batches_tracked`` may be absent
(torchvision's original weight files have none).

The file's sha256 is part of the run's config (``init_sha256``, filled in when the config is
built), so a resumed run whose file has changed is refused, and the file loaded is checked
against it.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flatminima.experiment.config import Config, ConfigError

_EXPECTED = "a state_dict file, a flatminima checkpoint or a run folder with last.pt"
_WRAPPERS = ("state_dict", "model", "model_state_dict")


def resolve_init_path(path: str | Path) -> Path:
    """The file ``init_from`` names (a run folder's ``last.pt``); one-line error if absent."""
    p = Path(path)
    if p.is_dir():
        p = p / "last.pt"
    if not p.is_file():
        raise ConfigError(f"init_from={str(path)!r}: not found (expected {_EXPECTED})")
    return p


_DIGESTS: dict[tuple[Any, ...], str] = {}


def file_digest(path: str | Path) -> str:
    """sha256 of a file's content (cached by path, inode, size and change times: a sweep builds
    many configs from one file)."""
    p = Path(path)
    try:
        st = p.stat()
        key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key not in _DIGESTS:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            _DIGESTS[key] = h.hexdigest()
    except OSError as e:
        raise ConfigError(f"init_from={str(path)!r}: cannot be read ({e.strerror})") from None
    return _DIGESTS[key]


def read_state_dict(path: str | Path, sha256: str | None = None) -> dict[str, Tensor]:
    """The ``{name: tensor}`` weights in ``path`` (see the module doc), on the CPU.

    With ``sha256``, the content read must have that digest (the file has not changed since
    the config was made)."""
    name = str(path)
    p = resolve_init_path(path)
    try:
        blob = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"init_from={name!r}: cannot be read ({e.strerror})") from None
    if sha256 is not None and (digest := hashlib.sha256(blob).hexdigest()) != sha256:
        raise ConfigError(f"init_from={name!r} has changed since this run's config was made "
                          f"(sha256 {digest[:12]}..., the config says {sha256[:12]}...); set "
                          "init_sha256=none to start from the file as it is now (a new run)")
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged or foreign files
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise ConfigError(f"init_from={name!r}: corrupted or not a weights file "
                          f"({why})") from None
    state = _unwrap(obj)
    if state is None:
        raise ConfigError(f"init_from={name!r}: no state_dict in it (expected a dict of "
                          "tensors, possibly under 'state_dict' or 'model')")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _unwrap(obj: Any) -> dict[str, Tensor] | None:
    for _ in range(3):  # e.g. {"model": {...}} of a flatminima checkpoint, {"state_dict": ...}
        if not isinstance(obj, Mapping):
            return None
        if obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj)
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return None
        obj = inner
    return None


# ----------------------------------------------------------------------------- torchvision names

_FROM_TORCHVISION: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"conv1\.(.+)"), lambda m: f"stem.0.{m[1]}"),
    (re.compile(r"bn1\.(.+)"), lambda m: f"stem.1.{m[1]}"),
    (re.compile(r"layer(\d+)\.(\d+)\.downsample\.(\d+)\.(.+)"),
     lambda m: f"stages.{int(m[1]) - 1}.{m[2]}.shortcut.{m[3]}.{m[4]}"),
    (re.compile(r"layer(\d+)\.(.+)"), lambda m: f"stages.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"fc\.(.+)"), lambda m: f"head.{m[1]}"),
]
_TO_TORCHVISION: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(r"stem\.0\.(.+)"), lambda m: f"conv1.{m[1]}"),
    (re.compile(r"stem\.1\.(.+)"), lambda m: f"bn1.{m[1]}"),
    (re.compile(r"stages\.(\d+)\.(\d+)\.shortcut\.(\d+)\.(.+)"),
     lambda m: f"layer{int(m[1]) + 1}.{m[2]}.downsample.{m[3]}.{m[4]}"),
    (re.compile(r"stages\.(\d+)\.(.+)"), lambda m: f"layer{int(m[1]) + 1}.{m[2]}"),
    (re.compile(r"head\.(.+)"), lambda m: f"fc.{m[1]}"),
]


def _rename(name: str, rules: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]]
            ) -> str:
    for pattern, new in rules:
        if m := pattern.fullmatch(name):
            return new(m)
    return name


def from_torchvision_resnet(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ResNet state_dict under this library's ResNet names (shapes unchanged)."""
    return {_rename(k, _FROM_TORCHVISION): v for k, v in state.items()}


def to_torchvision_resnet(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`from_torchvision_resnet`: our ResNet's state_dict under torchvision's
    names (``resnet18`` with ``stem="imagenet"``, ``resnet50``, ``resnet101``)."""
    return {_rename(k, _TO_TORCHVISION): v for k, v in state.items()}


def is_torchvision_resnet(state: Mapping[str, Tensor]) -> bool:
    return "conv1.weight" in state and any(k.startswith("layer1.") for k in state)


# ----------------------------------------------------------------------------- loading

def head_names(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """The parameter names of the model's last layer (found by running two zero inputs)."""
    from flatminima._nn import model_device
    from flatminima._params import last_layer_names

    example = torch.zeros(2, *input_shape, device=model_device(model))
    return last_layer_names(model, example)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def initialize(model: nn.Module, cfg: Config, input_shape: Sequence[int]) -> dict[str, Any]:
    """Load ``cfg.init_from`` into ``model`` (in place) as the module doc says; return a summary
    (``loaded`` tensor count, ``head``: ``"kept"`` / ``"reset"``, ``renamed``: the file had
    torchvision names)."""
    from flatminima.models.resnet import ResNet

    assert cfg.init_from is not None
    src = f"init_from={cfg.init_from!r}"
    state = read_state_dict(cfg.init_from, cfg.init_sha256)
    renamed = isinstance(model, ResNet) and is_torchvision_resnet(state)
    original = {_rename(k, _FROM_TORCHVISION): k for k in state} if renamed else {}
    if renamed:
        state = from_torchvision_resnet(state)
    own = model.state_dict()
    head = [n for n in head_names(model, input_shape) if n in own]

    def named(k: str) -> str:
        return f"{k!r} ({original[k]!r} in the file)" if k in original else repr(k)

    # The head: kept when asked (or, for auto, when it fits), else the fresh one stays.
    in_file = [n for n in head if n in state]
    fits = len(in_file) == len(head) and all(_shape(state[n]) == _shape(own[n]) for n in head)
    if cfg.init_head == "keep" and not fits:
        bad = next(n for n in head if n not in state or _shape(state[n]) != _shape(own[n]))
        why = ("is not in the file" if bad not in state else
               f"has shape {_shape(state[bad])} in the file, the model's is {_shape(own[bad])}")
        raise ConfigError(f"{src}, init_head=keep: the head's {named(bad)} {why}; use "
                          "init_head=auto or reset to start from a new head")
    keep_head = cfg.init_head == "keep" or (cfg.init_head == "auto" and fits)

    body = {k: v for k, v in state.items() if k not in head}
    for k, v in body.items():
        if k in own and _shape(v) != _shape(own[k]):
            hint = ""
            if renamed and k == "stem.0.weight":
                hint = " (torchvision's stem: set model.stem=imagenet)"
            raise ConfigError(f"{src} does not match model {cfg.model!r}: {named(k)} has shape "
                              f"{_shape(v)} in the file, the model's is {_shape(own[k])}{hint}")
    if cfg.init_strict:
        missing = [k for k in own if k not in head and k not in body
                   and not k.endswith(".num_batches_tracked")]
        if missing:
            raise ConfigError(f"{src} does not match model {cfg.model!r}: the model's "
                              f"{missing[0]!r} is not in the file ({len(missing)} missing; "
                              "init_strict=false loads what matches)")
        unexpected = [k for k in body if k not in own]
        if unexpected:
            raise ConfigError(f"{src} does not match model {cfg.model!r}: the file's "
                              f"{named(unexpected[0])} is not in the model "
                              f"({len(unexpected)} unexpected; init_strict=false loads what "
                              "matches)")
    load = {k: v for k, v in body.items() if k in own}
    if keep_head:
        load.update({n: state[n] for n in head})
    if not load:
        raise ConfigError(f"{src}: no tensor in the file matches a tensor of model "
                          f"{cfg.model!r}")
    with torch.no_grad():
        for k, v in load.items():
            own[k].copy_(v)  # state_dict() tensors share the model's storage
    return {"loaded": len(load), "head": "kept" if keep_head else "reset", "renamed": renamed}
