"""Experiments: configs, one training function, checkpoints, sweeps, comparisons and the CLI.

    from flatminima.experiment import load_config, train
    metrics = train(load_config("configs/train_mnist1d.yaml", ["rho=0.1", "seed=1"]))

The command line (``flatminima compare | train | sweep | measure | study``) is
:func:`flatminima.experiment.cli.main`.
"""

from __future__ import annotations

from flatminima.experiment.checkpoint import CheckpointError
from flatminima.experiment.config import Config, ConfigError, build_config, load_config
from flatminima.experiment.train import TrainingDiverged, train

__all__ = ["Config", "ConfigError", "CheckpointError", "TrainingDiverged", "build_config",
           "load_config", "train"]
