"""Paper protocols as data: a YAML file per table or figure, read, checked and scaled here.

A protocol file (``flatminima/study/protocols/<name>.yaml``; ``flatminima reproduce --list``)
holds everything an experiment of a paper depends on: the data sets and models
(``experiments``), the shared training settings (``base``), the seeds, how hyperparameters are
searched (``search``: the fair per-method learning-rate protocol of ``flatminima compare``, the
paper's own protocol, or a plain grid), what is measured at the selected models (``measure``), an
optional first stage whose weights initialize every run (``pretrain``) and, per scale
(``smoke``, ``cpu``, ``gpu``, ``paper``), what is reduced::

    name: nrs-table1
    paper: Zhao & Zhang 2022, Table 1
    base: {optimizer: sgd, momentum: 0.9, schedule: cosine, val_split: 0.1}
    seeds: [0, 1, 2]
    experiments:
      - label: CIFAR-10 / ResNet-18 / Basic
        base: {dataset: cifar10, model: resnet18, augment: basic}
        paper: {Baseline: 95.41, NRS: 96.11}
    search:
      fair: {variants: {Baseline: {method: baseline}, NRS: {method: nrs, rho: 0.1}},
             lrs: [0.05, 0.1], controls: true}
    scales:
      smoke: {experiment_base: {dataset: synthetic_images, model: cnn, epochs: 1}}

A scale's mapping is merged into the protocol (mappings merge key by key, anything else is
replaced); ``experiment_base`` is merged into every experiment's ``base``, ``only`` keeps the
listed experiment labels, and ``reduces`` says in words what the scale changes. The report
lists every setting a scale changes against the ``paper`` scale, so nothing is reduced silently.
"""

from __future__ import annotations

import copy
import importlib.resources
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flatminima.experiment.config import ConfigError, read_yaml

SCALES = ("smoke", "cpu", "gpu", "paper")
SEARCHES = ("fair", "paper", "grid")
MEASURES = ("hessian_top", "hessian_top_last_layer", "hessian_trace", "divergence")
_TOP_KEYS = ("name", "title", "paper", "measures", "hours", "notes", "kind", "command", "base",
             "seeds", "select", "experiments", "search", "measure", "pretrain", "scales",
             "verdict_metric")
_SCALE_KEYS = ("base", "seeds", "search", "experiment_base", "only", "measure", "pretrain",
               "reduces", "command", "select")
_EXPERIMENT_KEYS = ("label", "base", "paper", "paper_measures", "search")
_SEARCH_KEYS = {
    "fair": ("variants", "lrs", "controls"),
    "paper": ("baseline", "methods"),
    "grid": ("settings", "baseline"),
}


@dataclass
class Experiment:
    """One data set x model x augmentation of a table: its config and the paper's numbers."""

    label: str
    base: dict[str, Any]
    paper: dict[str, float] = field(default_factory=dict)
    paper_measures: dict[str, dict[str, float]] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)


@dataclass
class Protocol:
    """A protocol at one scale, every default filled in and every key checked."""

    name: str
    scale: str
    title: str
    paper: str
    measures: str
    hours: dict[str, str]
    notes: str
    kind: str
    base: dict[str, Any]
    seeds: list[int]
    select: str
    experiments: list[Experiment]
    search: dict[str, dict[str, Any]]
    measure: list[str]
    pretrain: dict[str, Any] | None
    reduces: str
    changes: list[str]
    command: list[str]
    source: str
    raw: dict[str, Any]


def protocols_dir() -> Path:
    return Path(str(importlib.resources.files("flatminima.study") / "protocols"))


def list_protocols() -> list[str]:
    """Names of the shipped protocols, in file-name order."""
    return sorted(p.stem for p in protocols_dir().glob("*.yaml"))


def find_protocol(name: str) -> Path:
    """The file of protocol ``name`` (a shipped name or a path to a YAML file)."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = protocols_dir() / f"{name}.yaml"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"unknown protocol {name!r}; choose one of {', '.join(list_protocols())} "
                      "or give a protocol YAML file")


def merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into ``base``: mappings key by key (recursively), anything else replaced."""
    if isinstance(base, Mapping) and isinstance(patch, Mapping):
        out = {k: copy.deepcopy(v) for k, v in base.items()}
        for k, v in patch.items():
            out[k] = merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    return copy.deepcopy(patch)


def _unknown(keys: Any, allowed: tuple[str, ...], where: str) -> None:
    bad = [k for k in keys if k not in allowed]
    if bad:
        raise ConfigError(f"{where}: unknown key {bad[0]!r} (keys: {', '.join(allowed)})")


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def load_protocol(name: str, scale: str = "cpu") -> Protocol:
    """Read protocol ``name`` (shipped name or YAML path) at ``scale``; bad content is a
    one-line :class:`ConfigError` naming the file and the key."""
    if scale not in SCALES:
        raise ConfigError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    path = find_protocol(name)
    raw = read_yaml(path)
    where = f"protocol {path.name}"
    _unknown(raw, _TOP_KEYS, where)
    scales = _mapping(raw.get("scales"), f"{where}: scales")
    _unknown(scales, SCALES, f"{where}: scales")
    for s, patch in scales.items():
        _unknown(_mapping(patch, f"{where}: scales.{s}"), _SCALE_KEYS, f"{where}: scales.{s}")
    patch = _mapping(scales.get(scale), f"{where}: scales.{scale}")
    spec = merge({k: v for k, v in raw.items() if k != "scales"},
                 {k: v for k, v in patch.items() if k not in ("experiment_base", "only",
                                                              "reduces")})
    kind = str(spec.get("kind", "train"))
    if kind not in ("train", "command"):
        raise ConfigError(f"{where}: kind must be 'train' or 'command', got {kind!r}")
    experiments = _experiments(spec, patch, where) if kind == "train" else []
    # A search set to null at a scale is left out there.
    search = {k: v for k, v in _mapping(spec.get("search"), f"{where}: search").items()
              if v is not None}
    _unknown(search, SEARCHES, f"{where}: search")
    for s, body in search.items():
        _unknown(_mapping(body, f"{where}: search.{s}"), _SEARCH_KEYS[s], f"{where}: search.{s}")
    if kind == "train" and not search:
        raise ConfigError(f"{where}: search: give at least one of {', '.join(SEARCHES)}")
    measure = list(spec.get("measure") or [])
    _unknown(measure, MEASURES, f"{where}: measure")
    seeds = spec.get("seeds", [0, 1, 2])
    if isinstance(seeds, int):
        seeds = list(range(seeds))
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of integers >= 0")
    pretrain = spec.get("pretrain")
    if pretrain is not None:
        pretrain = _mapping(pretrain, f"{where}: pretrain")
        _unknown(pretrain, ("base", "label"), f"{where}: pretrain")
    command = spec.get("command") or []
    if kind == "command" and (not isinstance(command, list) or not command):
        raise ConfigError(f"{where}: kind 'command' needs a command list")
    hours = {str(k): str(v) for k, v in _mapping(raw.get("hours"), f"{where}: hours").items()}
    return Protocol(
        name=str(raw.get("name", path.stem)), scale=scale, title=str(raw.get("title", "")),
        paper=str(raw.get("paper", "")), measures=str(raw.get("measures", "")), hours=hours,
        notes=str(raw.get("notes", "")).strip(), kind=kind,
        base=_mapping(spec.get("base"), f"{where}: base"), seeds=[int(s) for s in seeds],
        select=str(spec.get("select", "val_acc")), experiments=experiments, search=search,
        measure=measure, pretrain=pretrain, reduces=str(patch.get("reduces", "")).strip(),
        changes=scale_changes(raw, scale), command=[str(c) for c in command],
        source=str(path), raw=raw)


def _experiments(spec: Mapping[str, Any], patch: Mapping[str, Any], where: str
                 ) -> list[Experiment]:
    items = spec.get("experiments")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"{where}: experiments must be a non-empty list")
    extra = _mapping(patch.get("experiment_base"), f"{where}: experiment_base")
    out = []
    for i, item in enumerate(items):
        item = _mapping(item, f"{where}: experiments[{i}]")
        _unknown(item, _EXPERIMENT_KEYS, f"{where}: experiments[{i}]")
        if "label" not in item:
            raise ConfigError(f"{where}: experiments[{i}] needs a label")
        out.append(Experiment(
            label=str(item["label"]),
            base=merge(_mapping(item.get("base"), f"{where}: experiments[{i}].base"), extra),
            paper={str(k): float(v) for k, v in _mapping(item.get("paper"), where).items()},
            paper_measures={str(k): {str(m): float(x) for m, x in _mapping(v, where).items()}
                            for k, v in _mapping(item.get("paper_measures"), where).items()},
            search=_mapping(item.get("search"), f"{where}: experiments[{i}].search")))
    labels = [e.label for e in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where}: experiment labels must be distinct")
    for e in out:
        _unknown(e.search, SEARCHES, f"{where}: experiment {e.label!r}: search")
    only = patch.get("only")
    if only is not None:
        missing = [o for o in only if o not in labels]
        if missing:
            raise ConfigError(f"{where}: only: no experiment labelled {missing[0]!r}")
        out = [e for e in out if e.label in only]
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def scale_changes(raw: Mapping[str, Any], scale: str) -> list[str]:
    """Every setting ``scale`` changes against the ``paper`` scale, as ``key: paper -> scale``."""
    if scale == "paper":
        return []
    scales = raw.get("scales") or {}

    def resolved(s: str) -> dict[str, Any]:
        patch = dict(scales.get(s) or {})
        spec = merge({k: v for k, v in raw.items() if k not in ("scales", "experiments")},
                     {k: v for k, v in patch.items() if k not in ("experiment_base", "only",
                                                                  "reduces")})
        flat = _flatten({k: spec.get(k) for k in ("base", "seeds", "search", "measure",
                                                  "pretrain", "select")})
        if patch.get("experiment_base"):
            flat.update(_flatten(patch["experiment_base"], "every experiment"))
        if patch.get("only") is not None:
            flat["experiments"] = list(patch["only"])
        return flat

    paper, here = resolved("paper"), resolved(scale)
    out = []
    for key in sorted(set(paper) | set(here)):
        a, b = paper.get(key, "-"), here.get(key, "-")
        if a != b:
            out.append(f"{key}: {_short(a)} -> {_short(b)}")
    return out


def _short(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("...") else text
