"""Loss landscape figures: a 1-D line and a 2-D contour plot (arrays from fm.landscape)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def line_1d(alphas: Sequence[float], curves: Mapping[str, Sequence[float]], *,
            xlabel: str = "step along direction (filter-normalized)", ylabel: str = "loss",
            title: str | None = None, log: bool = False) -> Figure:
    """Loss (or accuracy) along a line: one curve per label, same x positions."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for name, values in curves.items():
        ax.plot(np.asarray(alphas, float), np.asarray(values, float), label=name, lw=1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def surface_2d(xs: Sequence[float], ys: Sequence[float], values: np.ndarray, *,
               label: str = "loss", title: str | None = None, levels: int = 30) -> Figure:
    """Contour plot of ``values[len(ys), len(xs)]`` over the plane spanned by two directions."""
    import matplotlib.pyplot as plt

    z = np.asarray(values, dtype=float)
    fig, ax = plt.subplots(figsize=(5.0, 4.2))
    cs = ax.contourf(np.asarray(xs, float), np.asarray(ys, float), z, levels=levels,
                     cmap="viridis")
    ax.contour(np.asarray(xs, float), np.asarray(ys, float), z, levels=levels, colors="k",
               linewidths=0.3, alpha=0.5)
    fig.colorbar(cs, ax=ax, label=label)
    ax.plot([0], [0], "r*", ms=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
