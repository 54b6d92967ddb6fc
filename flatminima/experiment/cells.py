"""Sweep plans: grids (or lists) of hyperparameter settings times seeds, as a list of cells.

A *cell* is one training run: a ``setting`` (config overrides such as ``method``, ``lr``, ``rho``)
and a ``seed``. Its ``key`` is the canonical JSON of both, so the same cell planned twice (by a
restarted sweep, or by a second worker) is recognized as the same.

A grid over method hyperparameters applies each to the methods that take it: in
``{method: [baseline, nrs], lr: [0.1], rho: [0.05, 0.1]}`` the Baseline cells ignore ``rho`` and
appear once per seed, not twice (the paper's grid search over rho and alpha, done per method).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flatminima.experiment.config import FIELDS, ConfigError, method_signature


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: a setting (config overrides) and a seed."""

    setting: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.setting)

    @property
    def setting_key(self) -> str:
        return json.dumps(self.params, sort_keys=True, default=str)

    @property
    def key(self) -> str:
        return json.dumps({"seed": self.seed, **self.params}, sort_keys=True, default=str)

    @property
    def slug(self) -> str:
        """A short file-system-safe name for the cell's run folder."""
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:10]
        method = str(self.params.get("method", "run"))
        return f"{method}-s{self.seed}-{digest}"


def _is_method_key(key: str) -> bool:
    return key not in FIELDS and not key.startswith(("model.", "model_args."))


def _any_method_takes(name: str) -> bool:
    from flatminima.methods import list_methods

    return any(name in method_signature(m) for m in list_methods())


def _applicable(setting: dict[str, Any], default_method: str) -> dict[str, Any]:
    """Drop the method hyperparameters that this cell's method does not take."""
    method = str(setting.get("method", default_method))
    accepted = method_signature(method)
    out = {}
    for k, v in setting.items():
        name = k.split(".", 1)[1] if k.startswith(("hparams.", "method.")) else k
        if _is_method_key(k) and name not in accepted:
            if not _any_method_takes(name):
                raise ConfigError(f"grid: unknown key {k!r}: neither a config field nor a "
                                  "hyperparameter of any method")
            continue
        out[k] = v
    return out


def expand(grid: Mapping[str, Sequence[Any]] | Sequence[Mapping[str, Any]],
           seeds: Iterable[int], *, default_method: str = "baseline",
           grid_kind: str = "grid") -> list[Cell]:
    """Cells of a ``grid`` (cartesian product of value lists; or a list of such grids, whose
    union is taken) or of a ``list`` (explicit settings), each repeated for every seed."""
    seeds = list(seeds)
    if not seeds:
        raise ConfigError("seeds: empty; give at least one seed")
    if grid_kind == "list":
        if not isinstance(grid, Sequence) or isinstance(grid, str):
            raise ConfigError("list: expected a list of settings (mappings)")
        settings = []
        for item in grid:
            if not isinstance(item, Mapping):
                raise ConfigError(f"list: item {item!r} is not a mapping")
            settings.append(dict(item))
    else:
        grids = [grid] if isinstance(grid, Mapping) else list(grid)
        settings = []
        for g in grids:
            if not isinstance(g, Mapping):
                raise ConfigError(f"grid: {g!r} is not a mapping of key: [values]")
            keys = list(g)
            values = []
            for k in keys:
                v = g[k]
                v = list(v) if isinstance(v, list | tuple) else [v]
                if not v:
                    raise ConfigError(f"grid: key {k!r} has no values")
                values.append(v)
            settings += [dict(zip(keys, combo, strict=True))
                         for combo in itertools.product(*values)]
    cells: list[Cell] = []
    seen: set[str] = set()
    for s in settings:
        if "seed" in s:
            raise ConfigError("grid: 'seed' is given by seeds=, not inside the grid")
        s = _applicable(s, default_method)
        for seed in seeds:
            cell = Cell(tuple(sorted(s.items())), int(seed))
            if cell.key not in seen:
                seen.add(cell.key)
                cells.append(cell)
    return cells


def parse_grid_option(items: Iterable[str]) -> dict[str, list[Any]]:
    """``["lr=0.05,0.1", "method=sgd,nrs"]`` -> ``{"lr": [0.05, 0.1], "method": [...]}``."""
    from flatminima.experiment.config import _parse_scalar

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid {item!r}: expected key=v1,v2,...")
        grid[key.strip()] = [_parse_scalar(v) for v in values.split(",")]
    return grid


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` or ``"3"`` (meaning 0, 1, 2) -> a list of seeds."""
    text = text.strip()
    try:
        if "-" in text[1:]:
            lo, hi = text.split("-", 1)
            seeds = list(range(int(lo), int(hi) + 1))
        elif "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        raise ConfigError(f"seeds={text!r}: expected a count (3), a list (0,1,2) or a range "
                          "(0-2)") from None
    if not seeds or any(s < 0 for s in seeds):
        raise ConfigError(f"seeds={text!r}: need at least one non-negative seed")
    return seeds
