"""The method registry: ``@register_method(name)`` on the class, ``create_method(name)`` to build.

As models and data sets are registered (``@register_model``), so are methods; every module of
this package is imported by the package, so a method in a new file is registered by being there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

M = TypeVar("M", bound=type)

METHODS: dict[str, type] = {}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator: register a :class:`~flatminima.methods.Method` subclass under ``name``.

    The name is the class's ``name`` attribute too (what ``repr``, logs and the command line's
    ``method=`` use). Registering two classes under one name is an error.
    """
    key = name.lower()

    def deco(cls: M) -> M:
        existing = METHODS.get(key)
        if existing is not None and existing is not cls:
            raise ValueError(f"method {key!r} is already registered by {existing.__qualname__}")
        cls.name = key
        METHODS[key] = cls
        return cls

    return deco


def list_methods() -> list[str]:
    """Registry names of all methods."""
    return list(METHODS)


def method_class(name: str) -> type:
    """The class registered under ``name``; ``ValueError`` listing the names otherwise."""
    key = str(name).lower()
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[key]


def create_method(name: str, **hparams: Any) -> Any:
    """Build a method by registry name; unknown names or arguments raise ``ValueError``."""
    cls = method_class(name)
    try:
        return cls(**hparams)
    except TypeError as e:
        raise ValueError(f"bad argument for method {name!r}: {e}") from None
