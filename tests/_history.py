"""The training history without its wall-clock columns, which differ between identical runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TIMING_KEYS = ("time_s", "step_ms")


def untimed(row: Mapping[str, Any], *drop: str) -> dict[str, Any]:
    """``row`` without the timing keys (and without ``drop``)."""
    return {k: v for k, v in row.items() if k not in TIMING_KEYS and k not in drop}
