"""``flatminima study generalization``: run the generalization-visualization study, write a report.

Example::

    flatminima study generalization --out reports/study            # spirals + MNIST, a few minutes
    flatminima study generalization --no-mnist --seeds 0,1 --poison-factors 0,0.1
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

from flatminima.study.pipeline import StudyConfig

SPIRALS_DEFAULT = StudyConfig()
#: The MNIST variant's smaller grid: 2 seeds, 3 poison factors, Baseline / NRS / SAM.
MNIST_DEFAULT = StudyConfig(seeds=(0, 1), poison_factors=(0.0, 0.1, 0.5),
                            methods=("baseline", "nrs", "sam"), lr_grid=(0.0001, 0.0003, 0.001),
                            steps=600, cutoffs=(0.5,), num_directions=20, rollout_directions=6)


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name} must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name} is empty")
    return values


def _ints(text: str, name: str) -> tuple[int, ...]:
    """``"3"`` -> (0, 1, 2); ``"0,4,7"`` -> (0, 4, 7); ``"2-4"`` -> (2, 3, 4)."""
    try:
        if "," in text:
            return tuple(int(v) for v in text.split(",") if v.strip())
        if "-" in text.strip("-"):
            lo, hi = text.split("-")
            return tuple(range(int(lo), int(hi) + 1))
        n = int(text)
    except ValueError:
        raise ValueError(f"{name} must be a count, a comma list or a range a-b, "
                         f"got {text!r}") from None
    if n < 1:
        raise ValueError(f"{name} count must be >= 1, got {text!r}")
    return tuple(range(n))


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip().lower() for w in text.split(",") if w.strip())


def add_parser(subparsers: Any) -> None:
    """Register ``study`` (with its ``generalization`` subcommand) on the CLI's subparsers."""
    p = subparsers.add_parser("study", help="reproducible studies (generalization: wide margins, "
                                            "flat basins and what poisoning does to them)")
    sub = p.add_subparsers(dest="study", metavar="STUDY")
    g = sub.add_parser(
        "generalization",
        help="two-spirals (and MNIST) study: decision boundaries, basin radius and log-volume "
             "of clean, poisoned and flat-minima-trained models",
        description="Train clean and poisoned models and models trained with flat-minima "
                    "methods (each at its own tuned learning rate), measure margins, basin "
                    "radius and log-volume, and write a Markdown + PNG report.")
    d = SPIRALS_DEFAULT
    g.add_argument("--out", default="reports/study", help="report folder (default: %(default)s)")
    g.add_argument("--seeds", default=",".join(map(str, d.seeds)),
                   help="count, comma list or range (default: %(default)s)")
    g.add_argument("--poison-factors", default=",".join(f"{f:g}" for f in d.poison_factors),
                   help="comma list; 0 is the clean model (default: %(default)s)")
    g.add_argument("--methods", default=",".join(d.methods),
                   help="comma list, must include baseline (default: %(default)s)")
    g.add_argument("--lrs", default=",".join(f"{v:g}" for v in d.lr_grid),
                   help="Adam learning-rate grid shared by all methods (default: %(default)s)")
    g.add_argument("--tune-seeds", default=str(len(d.tune_seeds)),
                   help="seeds of the tuning runs, count, list or range; tuning seed s "
                        "runs with seed 1000 + s (default: %(default)s)")
    g.add_argument("--steps", type=int, default=d.steps,
                   help="full-batch steps per model (default: %(default)s)")
    g.add_argument("--cutoffs", default=",".join(f"{c:g}" for c in d.cutoffs),
                   help="train-loss cutoffs of the basin (default: %(default)s)")
    g.add_argument("--directions", type=int, default=d.num_directions,
                   help="random directions per basin measurement (default: %(default)s)")
    g.add_argument("--noise", type=float, default=1.0, help="spiral noise std (default: 1)")
    g.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="worker processes, one thread each (default: %(default)s)")
    g.add_argument("--no-mnist", action="store_true", help="skip the MNIST variant")
    g.add_argument("--mnist-root", default="data/mnist",
                   help="folder with the MNIST IDX files (default: %(default)s)")
    g.add_argument("--no-download", action="store_true",
                   help="never download MNIST; a missing file is an error")
    md = MNIST_DEFAULT
    g.add_argument("--mnist-seeds", default=",".join(map(str, md.seeds)))
    g.add_argument("--mnist-poison-factors",
                   default=",".join(f"{f:g}" for f in md.poison_factors))
    g.add_argument("--mnist-methods", default=",".join(md.methods))
    g.add_argument("--mnist-lrs", default=",".join(f"{v:g}" for v in md.lr_grid))
    g.add_argument("--mnist-steps", type=int, default=md.steps)
    g.add_argument("--mnist-cutoffs", default=",".join(f"{c:g}" for c in md.cutoffs))
    g.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    g.set_defaults(run=run)
    p.set_defaults(run=_need_study(p))


def _need_study(parser: argparse.ArgumentParser) -> Any:
    def run_missing(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2
    return run_missing


def configs(args: argparse.Namespace) -> tuple[StudyConfig, StudyConfig | None]:
    """The spirals and (unless ``--no-mnist``) MNIST configurations from the arguments."""
    common = {"workers": args.workers, "tune_seeds": _ints(args.tune_seeds, "--tune-seeds")}
    spirals = StudyConfig(
        seeds=_ints(args.seeds, "--seeds"),
        poison_factors=_floats(args.poison_factors, "--poison-factors"),
        methods=_words(args.methods), lr_grid=_floats(args.lrs, "--lrs"), steps=args.steps,
        num_directions=args.directions, cutoffs=_floats(args.cutoffs, "--cutoffs"), **common)
    spirals.validate()
    if args.no_mnist:
        return spirals, None
    md = MNIST_DEFAULT
    mnist = StudyConfig(
        seeds=_ints(args.mnist_seeds, "--mnist-seeds"),
        poison_factors=_floats(args.mnist_poison_factors, "--mnist-poison-factors"),
        methods=_words(args.mnist_methods), lr_grid=_floats(args.mnist_lrs, "--mnist-lrs"),
        steps=args.mnist_steps, num_directions=min(args.directions, md.num_directions),
        cutoffs=_floats(args.mnist_cutoffs, "--mnist-cutoffs"),
        rollout_directions=md.rollout_directions, **common)
    mnist.validate()
    return spirals, mnist


def run(args: argparse.Namespace) -> int:
    from flatminima.study.report import write_report
    from flatminima.study.tasks import mnist_task, spirals_task

    if not (args.noise >= 0):
        raise ValueError(f"--noise must be >= 0, got {args.noise!r}")
    spirals_cfg, mnist_cfg = configs(args)
    # Load the data first, so a missing file fails before minutes of training.
    spirals = spirals_task(noise=args.noise)
    mnist = None
    if mnist_cfg is not None:
        mnist = mnist_task(args.mnist_root, download=not args.no_download)

    from flatminima.study.pipeline import run_study

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    results = [(run_study(spirals, spirals_cfg, log), spirals, "Two spirals")]
    if mnist is not None and mnist_cfg is not None:
        results.append((run_study(mnist, mnist_cfg, log), mnist,
                        "MNIST subset (poisoned with held-out digits, reverse cross-entropy)"))
    command = "flatminima study generalization " + " ".join(
        shlex.quote(a) for a in sys.argv[sys.argv.index("generalization") + 1:]
    ) if "generalization" in sys.argv else "flatminima study generalization"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary folder beside the target, then swap it in: nothing half-written.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    from flatminima.study.notes import PREAMBLE

    write_report(results, tmp, command=command.strip(), preamble=PREAMBLE)
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            _rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        _rmtree(old)
    else:
        os.replace(tmp, out)
    print(out / "report.md")
    return 0


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


__all__ = ["add_parser", "run", "configs"]
