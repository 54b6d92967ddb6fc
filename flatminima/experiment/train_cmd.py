"""``flatminima train [CONFIG.yaml] [key=value ...]``: one run; the resolved config is saved."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from flatminima.experiment.config import ConfigError, load_config


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train one model from a YAML config plus key=value overrides",
        description="Train one model. Keys: any field of flatminima.experiment.Config "
                    "(dataset, model, method, optimizer, lr, momentum, weight_decay, schedule, "
                    "warmup_epochs, epochs, batch_size, label_smoothing, augment, amp, seed, "
                    "device, out, ...), the method's hyperparameters (rho=0.05, alpha=1) and "
                    "model.<arg>=<value>. Started again with the same arguments, a run resumes "
                    "from its last checkpoint.")
    p.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                   help="an optional YAML file first, then overrides")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")


def split_items(items: list[str]) -> tuple[str | None, list[str]]:
    """The config file (first item without '=') and the overrides."""
    path = None
    overrides = []
    for i, item in enumerate(items):
        if "=" in item:
            overrides.append(item)
        elif i == 0:
            path = item
        else:
            raise ConfigError(f"argument {item!r}: expected key=value (the config file, if any, "
                              "comes first)")
    return path, overrides


def run(args: argparse.Namespace) -> int:
    from flatminima.experiment.train import train

    path, overrides = split_items(args.items)
    extra = {"quiet": True} if args.quiet else {}
    cfg = load_config(path, overrides, **extra)
    metrics = train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=1))
    elif not cfg.quiet:
        parts = [f"{k}={metrics[k]:.2f}" for k in ("train_acc", "val_acc", "test_acc")
                 if k in metrics]
        print(f"{cfg.method}: {', '.join(parts)}  (run folder {cfg.out})")
    return 0
