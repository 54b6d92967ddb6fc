"""Bar chart of mean ± std over seeds per method (final accuracy, Hessian eigenvalue, ...)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def error_bars(values: Mapping[str, Sequence[float]], *, ylabel: str, title: str | None = None,
               log: bool = False, show_points: bool = True) -> Figure:
    """One bar per key at the mean of its values, error bar ± std (ddof=1), seeds as dots.
    Non-finite values (diverged runs) are left out of mean and std."""
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(names) + 1.5), 4.0))
    for i, name in enumerate(names):
        v = np.asarray(values[name], dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            ax.text(i, 0, "diverged", ha="center", va="bottom", fontsize=8, rotation=90)
            continue
        std = float(np.std(v, ddof=1)) if v.size > 1 else 0.0
        ax.bar(i, v.mean(), yerr=std, capsize=4, color=f"C{i % 10}", alpha=0.8)
        if show_points:
            ax.plot(np.full(v.size, i), v, "k.", ms=4)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    else:
        finite = [x for n in names for x in np.asarray(values[n], float) if np.isfinite(x)]
        if finite and min(finite) > 0 and "acc" in ylabel.lower():
            lo, hi = min(finite), max(finite)
            ax.set_ylim(max(0.0, lo - 2 * (hi - lo + 1)), min(100.0, hi + (hi - lo + 1)))
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig
