"""Atomic checkpoints that load with ``weights_only=True`` and restore every random state.

A checkpoint is written to a temporary file in the same folder, flushed and ``fsync``-ed, then
moved over the old one with ``os.replace`` (atomic on POSIX and Windows) and the folder is
``fsync``-ed. A process killed at any instant therefore leaves either the previous checkpoint or the
new one, never a torn file.

Everything in it is a tensor, a number, a string, a list, a tuple or a dict, so
``torch.load(..., weights_only=True)`` reads it and nothing is unpickled. The random states saved
(torch CPU, every CUDA device, Python ``random``, NumPy, and any extra ``torch.Generator``) are what
makes a resumed CPU run bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or from an incompatible run."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then rename it over ``path``:
    readers see the old or the new file, never a mix; on any failure the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never a mix."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save(obj: Mapping[str, Any], path: str | Path) -> None:
    """``torch.save`` ``obj`` atomically to ``path`` (streamed, not held twice in memory)."""
    _atomic_write(path, lambda f: torch.save(dict(obj), f))


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; any damage is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, EOF, ...)
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupted or not a checkpoint "
                              f"({why})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a flatminima checkpoint "
                              "(no 'model' entry)")
    return obj


# ----------------------------------------------------------------------------- random states

def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """All random states a training run draws from, as weights-only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": _to_lists(random.getstate()),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any],
                  generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuples(state["python"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise CheckpointError(f"checkpoint has no state for generator {name!r}")
        gen.set_state(state["generators"][name].cpu())


def _to_lists(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_to_lists(v) for v in x]
    return x


def _to_tuples(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuples(v) for v in x)
    return x
