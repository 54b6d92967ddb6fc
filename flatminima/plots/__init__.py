"""Matplotlib figures from arrays and result tables (Agg backend: no display needed).

Every function returns a ``matplotlib.figure.Figure``; :func:`save_figure` writes it atomically.

    fig = fm.plots.curves({"NRS": acc_nrs, "Baseline": acc_base}, ylabel="test accuracy (%)")
    fm.plots.save_figure(fig, "curves.png")
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported anywhere: plots are files, never windows

from flatminima.plots._io import save_figure  # noqa: E402
from flatminima.plots.bars import error_bars  # noqa: E402
from flatminima.plots.curves import curves  # noqa: E402
from flatminima.plots.landscape import line_1d, surface_2d  # noqa: E402

__all__ = ["save_figure", "error_bars", "curves", "line_1d", "surface_2d"]
