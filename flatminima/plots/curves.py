"""Training curves: one line per method, mean over seeds with a band of ± one std."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure


def curves(series: Mapping[str, Sequence[Sequence[float]] | np.ndarray], *,
           x: Sequence[float] | None = None, xlabel: str = "epoch",
           ylabel: str = "test accuracy (%)", title: str | None = None) -> Figure:
    """``series[name]`` is an array ``[seeds, steps]`` (or one curve ``[steps]``); the figure
    shows the mean over seeds and shades mean ± std (ddof=1)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for name, values in series.items():
        arr = np.atleast_2d(np.asarray(values, dtype=float))
        if arr.size == 0:
            continue
        xs = np.arange(1, arr.shape[1] + 1) if x is None else np.asarray(x, dtype=float)
        # Steps without a value (a run evaluated every few epochs) are left out, not drawn as
        # gaps: NaN between every two points would leave no line at all.
        keep = np.isfinite(arr).any(axis=0)
        if not keep.any():
            continue
        arr, xs = arr[:, keep], xs[keep]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step only some seeds have
            mean = np.nanmean(arr, axis=0)
            std = np.nanstd(arr, axis=0, ddof=1) if arr.shape[0] > 1 else None
        (line,) = ax.plot(xs, mean, label=name, lw=1.6, marker="o" if len(xs) <= 12 else None,
                          markersize=3)
        if std is not None:
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
