"""A method's hyperparameters, declared once.

Each argument of a method is one class attribute::

    class RWP(RandomPerturbation):
        gamma = hparam(0.01, check_nonneg, "noise std relative to each filter's norm")
        mix = hparam(0.5, check_unit_interval, "weight of the perturbed gradient")

and everything else is derived from that declaration: the constructor's signature (positional
hyperparameters in declaration order, then keyword-only options), validation at construction
and on every call, ``hparams()``, ``repr``, ``state_dict()`` / ``load_state_dict()`` and the keys
the command line accepts (``flatminima train method=rwp gamma=0.02``).

Three kinds of declaration:

* :func:`hparam`: a number or a name that defines the objective; in ``hparams()`` and the
  state, a command-line key; positional unless declared ``positional=False``.
* :func:`option`: keyword-only, a command-line key, not part of the state (``share_noise``).
* :func:`argument`: keyword-only, an object that only Python code can pass (``noise=``,
  ``params=``); neither in the state nor on the command line.

A subclass may declare an inherited name again to change its default (SmoothOut's
``params="no_norm"``); it keeps the position of the first declaration.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Check = Callable[[Any, str], Any]
KINDS = ("hparam", "option", "argument")


@dataclass
class HParam:
    """One declared argument: a data descriptor on the method class.

    ``check(value, name)`` returns the value in canonical form or raises ``ValueError`` naming
    it; it runs at construction and on every ``backward`` call (so a schedule may assign the
    attribute between steps). ``convert`` runs on every assignment and must not fail: it makes a
    value reusable (a one-shot iterator of names becomes a tuple). ``type`` is what the command
    line coerces a ``key=value`` string to (by default the default's type).
    """

    default: Any
    check: Check | None = None
    doc: str = ""
    kind: str = "hparam"
    convert: Callable[[Any], Any] | None = None
    type: Any = None
    positional: bool | None = None
    name: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.positional is None:
            self.positional = self.kind == "hparam"
        if self.type is None:
            self.type = Any if self.default is None else type(self.default)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get(self.name, self.default)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.name] = self.convert(value) if self.convert is not None else value

    def validated(self, value: Any) -> Any:
        return self.check(value, self.name) if self.check is not None else value


def hparam(default: Any, check: Check | None = None, doc: str = "", **kw: Any) -> Any:
    """A hyperparameter: positional, in ``hparams()`` and the state, a command-line key."""
    return HParam(default, check, doc, "hparam", **kw)


def option(default: Any, check: Check | None = None, doc: str = "", **kw: Any) -> Any:
    """A keyword-only setting that is a command-line key but not part of the state."""
    return HParam(default, check, doc, "option", **kw)


def argument(default: Any, check: Check | None = None, doc: str = "", **kw: Any) -> Any:
    """A keyword-only object argument (a callable, a selection): Python only."""
    return HParam(default, check, doc, "argument", **kw)


def collect(cls: type) -> dict[str, HParam]:
    """The declarations of ``cls`` and its bases, base-first, overrides in place."""
    out: dict[str, HParam] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, HParam):
                out[name] = value
    # Positional hyperparameters first, in declaration order; keyword-only ones after.
    return dict(sorted(out.items(), key=lambda kv: not kv[1].positional))


def signature(declared: dict[str, HParam]) -> inspect.Signature:
    """The constructor signature the declarations stand for (shown by ``help`` and IDEs)."""
    params = [
        inspect.Parameter(
            name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD if d.positional
            else inspect.Parameter.KEYWORD_ONLY,
            default=d.default,
            annotation=d.type if d.type is not Any else inspect.Parameter.empty,
        )
        for name, d in declared.items()
    ]
    return inspect.Signature(params)


def describe(declared: dict[str, HParam]) -> str:
    """An ``Args:`` block generated from the declarations, appended to the class docstring."""
    lines = ["Args:"]
    for name, d in declared.items():
        kind = "" if d.kind == "hparam" else f" ({d.kind})"
        lines.append(f"    {name}{kind}: {d.doc} Default ``{d.default!r}``.".rstrip())
    return "\n".join(lines)
