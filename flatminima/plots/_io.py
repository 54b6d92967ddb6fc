"""Writing figures: PNG (or any matplotlib format) through a temporary file and a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120) -> Path:
    """Save ``fig`` to ``path`` atomically (the format follows the suffix) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        plt.close(fig)
    return path
