"""Argument checks shared by the methods and the measurements.

Every public function validates its arguments before it touches a model, and a bad value raises
``ValueError`` whose message names the argument and the value, in one line (the CLI prints it as
it is). The checks return the value in its canonical type, so callers write
``k = check_positive_int(k, "k")``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def check_nonneg(value: Any, name: str) -> float:
    """``value`` as a finite float ``>= 0``; a bool is refused (never a meant size)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def check_unit_interval(value: Any, name: str) -> float:
    """``value`` as a float in ``[0, 1]``."""
    number = check_nonneg(value, name)
    if number > 1:
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
    return number


def check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an ``int >= minimum``; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_optional_positive_int(value: Any, name: str, minimum: int = 1) -> int | None:
    """``None`` or an ``int >= minimum``."""
    return None if value is None else check_positive_int(value, name, minimum)


def check_choice(value: T, choices: Iterable[T], what: str) -> T:
    """``value`` if it is one of ``choices``; the message lists them."""
    options = tuple(choices)
    if value not in options:
        listed = ", ".join(str(c) for c in options)
        raise ValueError(f"unknown {what} {value!r}; choose one of {listed}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is a bool (``0``/``1`` and strings are refused: they hide typos)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_callable(value: Any, name: str, *, optional: bool = False) -> Callable[..., Any] | None:
    """``value`` if it is callable (or ``None`` when ``optional``)."""
    if value is None and optional:
        return None
    if not callable(value):
        raise ValueError(f"{name} must be callable, got {value!r}")
    return value
