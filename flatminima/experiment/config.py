"""Run configuration: one flat dataclass, read from YAML and ``key=value`` overrides.

Every field is checked for type and range when the config is built, so a bad value fails before
any data is loaded or any file is written, with a one-line :class:`ConfigError` naming the key.

Keys that are not fields of :class:`Config` are the chosen method's hyperparameters (``rho=0.05``,
``alpha=1``) or, with a ``model.`` prefix, keyword arguments of the model (``model.width=128``).
They may also be given nested, as in YAML::

    method: nrs
    hparams: {rho: 0.05, alpha: 1.0}
    model: mlp
    model_args: {width: 256}

Example::

    cfg = load_config("configs/train_mnist1d.yaml", ["method=nrs", "rho=0.05", "lr=0.1"])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AUGMENTS = ("none", "basic", "cutout", "heavy")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Fields that change what is computed. The others (where to log, how chatty) may differ between
# the run that wrote a checkpoint and the one that resumes it.
_PRESENTATION_FIELDS = ("out", "quiet", "tensorboard", "device", "resume", "progress_desc",
                        "threads", "eval_every")
# Fields added after runs were saved, with their defaults: at the default they stay out of the
# identity, so the fingerprints (and run folders) of every earlier config are unchanged.
_LATER_FIELDS = {"method_every": 1, "method_reuse": "none", "method_reuse_alpha": 0.7,
                 "method_start": 0.0, "method_stop": 1.0, "amp_dtype": "auto"}
# Autocast dtypes for amp=true: auto is float16 with a GradScaler on CUDA, bfloat16 elsewhere.
AMP_DTYPES = ("auto", "float16", "bfloat16")
REUSES = ("none", "looksam", "difference")


class ConfigError(ValueError):
    """A bad configuration value; the message is one line and names the key."""


@dataclass
class Config:
    """Everything one training run depends on.

    Data: ``dataset`` by registry name, optional ``data_root``, ``data_classes`` (keep only
    these classes, relabelled in order), ``subset_per_class`` training examples per class,
    symmetric ``label_noise``, and ``val_split``: the fraction of the training set held out
    (stratified, fixed by ``data_seed``) for model selection, so the test set is never used to
    choose hyperparameters.
    ``threads`` sets ``torch.set_num_threads`` for the run (CPU; a resumed run must use the same
    count to be bitwise identical; 1 is fastest for tiny models on a loaded machine).
    Optimization: ``optimizer`` SGD (``momentum``, ``nesterov``; L2 ``weight_decay``) or AdamW
    (``momentum`` is beta1; decoupled ``weight_decay``), a per-step ``schedule`` (cosine / step
    at ``milestones`` times ``lr_gamma`` / constant) after ``warmup_epochs`` of linear warm-up,
    ``grad_clip`` on the global norm.
    Evaluation: the train and test splits are evaluated every ``eval_every`` epochs and after the
    last one (the validation split after every epoch); the weights and the final metrics do not
    depend on it, only which rows of the history carry ``train_*``/``test_*`` columns, so it is
    not part of the fingerprint. ``eval_batch_size`` examples per evaluation pass (at most 128
    on a CPU, where larger batches are only slower).
    Paying less for the method (``fm.Every``): it runs on every ``method_every``-th step, the
    plain gradient in between, plus with ``method_reuse`` (``looksam``, ``difference``) what
    its last run added (LookSAM's ``alpha`` is ``method_reuse_alpha``); and only from
    ``method_start`` to ``method_stop``, fractions of the run's optimizer steps
    (``method_start=0.7``: the last 30%), the plain gradient outside.
    """

    # data
    dataset: str = "mnist1d"
    data_root: str | None = None
    subset_per_class: int | None = None
    label_noise: float = 0.0
    val_split: float = 0.0
    data_seed: int = 0
    augment: str = "none"
    data_classes: list[int] | None = None
    # model
    model: str = "mlp"
    model_args: dict[str, Any] = field(default_factory=dict)
    # initialization from saved weights (fine-tuning); see flatminima.experiment.init
    init_from: str | None = None
    init_head: str = "auto"
    init_strict: bool = True
    init_sha256: str | None = None
    # method
    method: str = "baseline"
    hparams: dict[str, Any] = field(default_factory=dict)
    method_every: int = 1
    method_reuse: str = "none"
    method_reuse_alpha: float = 0.7
    method_start: float = 0.0
    method_stop: float = 1.0
    # optimization
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    lr_gamma: float = 0.1
    epochs: int = 20
    batch_size: int = 128
    eval_batch_size: int = 1000
    eval_every: int = 1
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    body_lr: float | None = None
    amp: bool = False
    amp_dtype: str = "auto"
    # curvature during training; see flatminima.experiment.curvature
    curvature_every: int = 0
    curvature_examples: int = 512
    curvature_trace: bool = False
    curvature_last_layer: bool = False
    # reproducibility and output
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    out: str = "runs/train"
    resume: bool = True
    quiet: bool = False
    tensorboard: bool = True
    progress_desc: str | None = None

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the result (everything but output and verbosity)."""
        d = self.to_dict()
        for k in _PRESENTATION_FIELDS:
            d.pop(k)
        for k, default in _LATER_FIELDS.items():
            if d[k] == default:
                d.pop(k)
        return d

    def fingerprint(self) -> str:
        """Short stable hash of :meth:`identity` (names run folders, detects config changes)."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> Config:
        if "init_from" in changes and "init_sha256" not in changes:
            changes["init_sha256"] = None  # the digest of the new file, computed on validation
        return dataclasses.replace(self, **changes)


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


# ----------------------------------------------------------------------------- validation

def _fail(key: str, value: Any, why: str) -> typing.NoReturn:
    raise ConfigError(f"{key}={value!r}: {why}")


def _in_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
              lo_open: bool = False, hi_open: bool = False) -> None:
    if not math.isfinite(value):
        _fail(key, value, "must be finite")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(key, value, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(key, value, f"must be {'<' if hi_open else '<='} {hi}")


def _choice(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        _fail(key, value, f"unknown; choose one of {', '.join(choices)}")


def validate(cfg: Config) -> None:
    """Check types and ranges of every field (names of datasets / models / methods included)."""
    for name, hint in _HINTS.items():
        setattr(cfg, name, coerce(name, getattr(cfg, name), hint))
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("schedule", cfg.schedule, SCHEDULES)
    _choice("augment", cfg.augment, AUGMENTS)
    _choice("device", cfg.device, DEVICES)
    _in_range("lr", cfg.lr, 0, lo_open=True)
    _in_range("momentum", cfg.momentum, 0, 1, hi_open=True)
    _in_range("weight_decay", cfg.weight_decay, 0)
    _in_range("warmup_epochs", cfg.warmup_epochs, 0)
    _in_range("lr_gamma", cfg.lr_gamma, 0, 1)
    _in_range("label_noise", cfg.label_noise, 0, 1, hi_open=True)
    _in_range("val_split", cfg.val_split, 0, 1, hi_open=True)
    _in_range("label_smoothing", cfg.label_smoothing, 0, 1, hi_open=True)
    _in_range("method_every", cfg.method_every, 1)
    _choice("method_reuse", cfg.method_reuse, REUSES)
    _choice("amp_dtype", cfg.amp_dtype, AMP_DTYPES)
    _in_range("method_reuse_alpha", cfg.method_reuse_alpha, 0)
    _in_range("method_start", cfg.method_start, 0, 1, hi_open=True)
    _in_range("method_stop", cfg.method_stop, 0, 1, lo_open=True)
    if cfg.method_reuse != "none" and cfg.method_every == 1:
        _fail("method_reuse", cfg.method_reuse, "reuses between runs of the method: needs "
              "method_every > 1")
    if cfg.method_stop <= cfg.method_start:
        _fail("method_stop", cfg.method_stop, f"must exceed method_start={cfg.method_start}")
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
        _in_range(key, getattr(cfg, key), 1)
    if cfg.subset_per_class is not None:
        _in_range("subset_per_class", cfg.subset_per_class, 1)
    if cfg.threads is not None:
        _in_range("threads", cfg.threads, 1)
    if cfg.grad_clip is not None:
        _in_range("grad_clip", cfg.grad_clip, 0, lo_open=True)
    for m in cfg.milestones:
        _in_range("milestones", m, 0, lo_open=True)
    if cfg.warmup_epochs > cfg.epochs:
        _fail("warmup_epochs", cfg.warmup_epochs, f"exceeds epochs={cfg.epochs}")
    _check_init(cfg)
    _check_curvature(cfg)
    _check_registries(cfg)


INIT_HEADS = ("auto", "keep", "reset")


def _check_init(cfg: Config) -> None:
    """Fine-tuning keys; ``init_sha256`` is filled in from the file when not given."""
    _choice("init_head", cfg.init_head, INIT_HEADS)
    if cfg.body_lr is not None:
        _in_range("body_lr", cfg.body_lr, 0)
    if cfg.init_from is None:
        if cfg.init_sha256 is not None:
            _fail("init_sha256", cfg.init_sha256, "given without init_from")
        return
    if not cfg.init_from.strip():
        _fail("init_from", cfg.init_from, "must not be empty")
    if cfg.init_sha256 is not None:
        digest = cfg.init_sha256.lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            _fail("init_sha256", cfg.init_sha256, "must be 64 hexadecimal digits")
        cfg.init_sha256 = digest
        return
    from flatminima.experiment.init import file_digest, resolve_init_path

    cfg.init_sha256 = file_digest(resolve_init_path(cfg.init_from))


def _check_curvature(cfg: Config) -> None:
    _in_range("curvature_every", cfg.curvature_every, 0)
    _in_range("curvature_examples", cfg.curvature_examples, 1)


def _check_registries(cfg: Config) -> None:
    # Imported here: the registries pull in torch models and data code, which a config alone
    # (e.g. a sweep plan) does not need.
    from flatminima.data import list_datasets
    from flatminima.methods import list_methods
    from flatminima.models import list_models

    _choice("dataset", cfg.dataset, list_datasets())
    _choice("model", cfg.model, list_models())
    _choice("method", cfg.method, list_methods())
    cfg.hparams = check_hparams(cfg.method, cfg.hparams)


def method_signature(method: str) -> dict[str, Any]:
    """The keys a config may set for ``method`` (its declared hyperparameters and options), each
    with its declaration (``.default``, ``.type``, ``.doc``)."""
    from flatminima.methods import method_class

    try:
        return method_class(method).config_keys()
    except ValueError:
        raise ConfigError(f"method={method!r}: unknown") from None


def check_hparams(method: str, hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Coerce ``hparams`` to the types of the method's defaults and let the method validate them."""
    from flatminima.methods import create_method

    sig = method_signature(method)
    out: dict[str, Any] = {}
    for key, value in hparams.items():
        if key not in sig:
            allowed = ", ".join(sig) or "none"
            raise ConfigError(f"unknown key {key!r}: neither a config field nor a hyperparameter "
                              f"of method {method!r} (it takes: {allowed})")
        out[key] = coerce(key, value, sig[key].type)
    try:
        create_method(method, **out)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"method {method!r}: {_one_line(e)}") from None
    return out


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


# ----------------------------------------------------------------------------- type coercion

def _parse_scalar(text: str) -> Any:
    """Read an override's value with YAML's rules (``1e-3`` is a float, ``none`` is None)."""
    text = text.strip()
    if text.lower() in ("none", "null", "~"):
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` as type ``hint`` or raise :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(key, value, inner[0])
    if value is None and hint is str:
        # `augment=none` is read as None by the override parser; a field that cannot be empty
        # takes it as the word, and its own choice check judges it.
        return "none"
    if value is None:
        _fail(key, value, "must not be empty")
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            _fail(key, value, "must be a mapping")
        return {str(k): v for k, v in value.items()}
    if origin is list or hint is list:
        if isinstance(value, str | int | float):
            value = [value]
        if not isinstance(value, list | tuple):
            _fail(key, value, "must be a list")
        item = args[0] if args else Any
        return [coerce(key, v, item) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no",
                                                        "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        _fail(key, value, "must be true or false")
    if hint is int:
        if isinstance(value, bool):
            _fail(key, value, "must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        _fail(key, value, "must be an integer")
    if hint is float:
        if isinstance(value, bool):
            _fail(key, value, "must be a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            _fail(key, value, "must be a number")
        if not math.isfinite(out):
            _fail(key, value, "must be finite")
        return out
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            _fail(key, value, "must be a string")
        return str(value)
    return value


# ----------------------------------------------------------------------------- building

def split_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """Parse ``["lr=0.1", "rho=5e-2"]`` into ``{"lr": 0.1, "rho": 0.05}``."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        out[key] = _parse_scalar(value)
    return out


# Config fields renamed since a config could be saved, by old name (``gamma`` was the step
# schedule's decay factor; RWP's noise scale is ``gamma`` too). Saved configs (checkpoints,
# ``config.yaml``) are read with the old names mapped; on a command line the old name is the
# method's, or an error naming the new field.
_RENAMED = {"gamma": "lr_gamma"}


def build_config(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a flat or nested mapping (see the module doc)."""
    fields: dict[str, Any] = {}
    method = str(values.get("method", Config.method))
    hparams: dict[str, Any] = {}
    model_args: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key)
        if key == "hparams" or key == "model_args":
            if not isinstance(value, Mapping):
                _fail(key, value, "must be a mapping")
            (hparams if key == "hparams" else model_args).update(value)
        elif key.startswith("hparams.") or key.startswith("method."):
            hparams[key.split(".", 1)[1]] = value
        elif key.startswith("model.") or key.startswith("model_args."):
            model_args[key.split(".", 1)[1]] = value
        elif key in FIELDS:
            if key in _method_keys(method):
                raise ConfigError(f"{key!r} is ambiguous for method {method!r}: write "
                                  f"method.{key}=... for the method's hyperparameter")
            fields[key] = value
        else:
            if key in _RENAMED and key not in _method_keys(method):
                raise ConfigError(f"unknown key {key!r}: it is now {_RENAMED[key]!r}")
            hparams[key] = value  # checked against the method's signature
    fields.setdefault("hparams", {})
    fields.setdefault("model_args", {})
    fields["hparams"] = {**coerce("hparams", fields["hparams"], dict), **hparams}
    fields["model_args"] = {**coerce("model_args", fields["model_args"], dict), **model_args}
    try:
        return Config(**fields)
    except TypeError as e:  # a field given the wrong structure
        raise ConfigError(_one_line(e)) from None


def _method_keys(method: str) -> dict[str, Any]:
    try:
        return method_signature(method)
    except ConfigError:
        return {}  # an unknown method: reported by validation


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or bad syntax is a one-line :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r}: malformed YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r}: not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of key: value")
    return data


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                **extra: Any) -> Config:
    """YAML file (optional), then ``key=value`` overrides, then keyword values, validated."""
    values: dict[str, Any] = dict(read_yaml(path)) if path is not None else {}
    values.update(split_overrides(overrides))
    values.update(extra)
    return build_config(values)


def config_from_dict(d: Mapping[str, Any]) -> Config:
    """Rebuild a config saved by :meth:`Config.to_dict` (e.g. from a checkpoint).

    A saved config holds every field at the top and the method's hyperparameters under
    ``hparams``, so an old field name there still means the field.
    """
    saved = {_RENAMED.get(k, k) if k not in ("hparams", "model_args") else k: v
             for k, v in d.items()}
    return build_config(saved)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
