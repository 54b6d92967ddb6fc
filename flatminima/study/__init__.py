"""Reproducible studies built on the library.

``generalization`` (Huang et al. 2019, "Understanding Generalization through Visualizations"):
train clean, poisoned and flat-minima models on the two spirals (and an MNIST subset), and show
their decision boundaries, margins, basin radii and log-volumes. Run it with
``flatminima study generalization``; the pieces:

* :mod:`~flatminima.study.model` - the study's MLPs;
* :mod:`~flatminima.study.poison` - reverse cross-entropy and the poisoned objective;
* :mod:`~flatminima.study.train` - full-batch training with any method;
* :mod:`~flatminima.study.boundary` - decision-boundary grids and input margins;
* :mod:`~flatminima.study.measure` - rollouts, basin radius, log-volume;
* :mod:`~flatminima.study.tasks` - the data of each study, with its poison set;
* :mod:`~flatminima.study.pipeline` - tune, train and measure every model;
* :mod:`~flatminima.study.report` - the Markdown + PNG report.
"""

from __future__ import annotations

from flatminima.study.boundary import DecisionGrid, decision_grid, input_margins
from flatminima.study.model import make_mlp, mnist_mlp, spiral_mlp
from flatminima.study.poison import PoisonedLoss, poison_targets, reverse_cross_entropy
from flatminima.study.train import accuracy, train_full_batch

__all__ = [
    "DecisionGrid", "decision_grid", "input_margins", "make_mlp", "mnist_mlp", "spiral_mlp",
    "PoisonedLoss", "poison_targets", "reverse_cross_entropy", "accuracy", "train_full_batch",
]
