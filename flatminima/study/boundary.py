"""Decision boundaries of 2-D classifiers on a grid, and the input-space margin of each point.

Huang et al. (2019) explain the generalization of the two-spirals network by the *margin* of its
decision boundary: a good model keeps the boundary far from every training point, a poisoned one
wraps each point in a small island. The study shows the boundary as the predicted class on a grid
and measures the margin of a point ``x`` with label ``y`` as the signed distance

    m(x) = +dist(x, {z : f(z) != y})   if f(x) == y,
    m(x) = -dist(x, {z : f(z) == y})   otherwise,

estimated on the grid with an exact Euclidean distance transform (SciPy's), so its error is at
most half a grid cell diagonal.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn


@dataclass
class DecisionGrid:
    """Predicted class and class-1 probability of a 2-D, 2-class model on a square grid.

    ``coords`` is the 1-D coordinate vector (the same on both axes); ``pred[i, j]`` and
    ``prob[i, j]`` belong to the point ``(coords[j], coords[i])`` (row = second input).
    """

    coords: np.ndarray
    pred: np.ndarray
    prob: np.ndarray

    @property
    def spacing(self) -> float:
        return float(self.coords[1] - self.coords[0])


@torch.no_grad()
def decision_grid(model: nn.Module, extent: float = 18.0, resolution: int = 400) -> DecisionGrid:
    """Evaluate ``model`` (eval mode) on a ``resolution``-square grid over ``[-extent, extent]^2``.

    The paper plots the spirals on ``[-18, 18]^2``, which holds every point of the default set.
    """
    if not extent > 0:
        raise ValueError(f"extent must be > 0, got {extent!r}")
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution!r}")
    model.eval()
    param = next(model.parameters())
    coords = torch.linspace(-extent, extent, resolution, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1).to(param.dtype).to(param.device)
    probs = torch.cat([model(chunk).softmax(dim=1) for chunk in pts.split(65536)])
    if probs.shape[1] != 2:
        raise ValueError(f"decision_grid needs a 2-class model, got {probs.shape[1]} outputs")
    prob1 = probs[:, 1].reshape(resolution, resolution).cpu().double().numpy()
    pred = probs.argmax(dim=1).reshape(resolution, resolution).cpu().numpy()
    return DecisionGrid(coords=coords.numpy(), pred=pred, prob=prob1)


def input_margins(grid: DecisionGrid, x: Tensor, y: Tensor) -> np.ndarray:
    """Signed input-space distance of each point ``(x_i, y_i)`` to the decision boundary.

    Positive for correctly classified points, negative otherwise (see the module doc); a point
    whose grid region has no cell of the other class gets ``+inf``. Points outside the grid are
    clamped to its border.
    """
    xs = x.detach().cpu().double().numpy()
    labels = y.detach().cpu().numpy()
    h = grid.spacing
    # Distance (in grid units) from every cell to the nearest cell predicted as the other class.
    dist = {}
    for c in (0, 1):
        mask = grid.pred == c
        dist[c] = ndimage.distance_transform_edt(mask) if (~mask).any() else np.full(mask.shape,
                                                                                      np.inf)
    n = len(grid.coords)
    col = np.clip(np.rint((xs[:, 0] - grid.coords[0]) / h).astype(int), 0, n - 1)
    row = np.clip(np.rint((xs[:, 1] - grid.coords[0]) / h).astype(int), 0, n - 1)
    pred_at = grid.pred[row, col]
    out = np.empty(len(xs))
    for i, (r, c_, lab, p) in enumerate(zip(row, col, labels, pred_at, strict=True)):
        # Inside a region of class p the transform of p's mask is the distance to the other class;
        # the cell itself counts as half a cell from the boundary.
        d = (dist[int(p)][r, c_] - 0.5) * h
        out[i] = d if p == lab else -d
    return out


__all__ = ["DecisionGrid", "decision_grid", "input_margins"]
