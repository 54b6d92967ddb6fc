"""The ``flatminima`` command line: ``compare``, ``train``, ``sweep``, ``measure``, ``study``,
``reproduce``.

Each subcommand lives in its own module with ``add_parser(subparsers)`` and ``run(args) -> int``.
Every expected error (bad name, key, value or file; damaged checkpoint) ends with one line on
stderr and exit status 2; a diverged run with exit status 3; nothing is half-written, because
reports are built in a temporary folder and renamed into place. Set ``FLATMINIMA_DEBUG=1`` to see
the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

EXIT_USAGE = 2
EXIT_DIVERGED = 3

# name -> module with add_parser / run; imported lazily so a missing piece breaks only itself.
SUBCOMMANDS = {
    "compare": "flatminima.experiment.compare",
    "train": "flatminima.experiment.train_cmd",
    "sweep": "flatminima.experiment.sweep",
    "measure": "flatminima.experiment.measure",
    "study": "flatminima.study.cli",
    "reproduce": "flatminima.study.reproduce",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error message (no usage block) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {one_line(message)} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def one_line(message: Any) -> str:
    return " ".join(str(message).split())


def build_parser(only: str | None = None
                 ) -> tuple[ArgumentParser, dict[str, Any], dict[str, str]]:
    """The parser, the imported subcommand modules, and for each subcommand that could not be
    imported, the reason. ``only`` imports just that subcommand (a faster start)."""
    parser = ArgumentParser(
        prog="flatminima",
        description="Train toward flat minima and measure flatness. "
                    "Run `flatminima compare` for the default comparison.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    missing: dict[str, str] = {}
    modules: dict[str, Any] = {}
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing[name] = one_line(e)
            continue
        mod.add_parser(sub)
        modules[name] = mod
    return parser, modules, missing


def _expected_errors() -> tuple[type[BaseException], ...]:
    import yaml

    return (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError, yaml.YAMLError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flatminima`` script; returns the exit status.

    Run as a program (``argv`` None) under ``torchrun``, the process ends here: see
    :func:`leave_without_teardown`.
    """
    status = _main(argv)
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_without_teardown(status)
    return status


def leave_without_teardown(status: int) -> NoReturn:
    """End a torchrun worker with ``status`` after its command is done, skipping interpreter
    teardown.

    After every file is written and the process group destroyed, gloo's C++ threads can still
    abort the interpreter's final teardown (SIGABRT, "terminate called without an active
    exception", with no Python frame left on the stack; about one run in 50 on a loaded
    machine), and torchrun then reports the completed run as failed and stops the other ranks.
    Nothing remains to be cleaned up, so the streams are flushed and the process exits directly.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser, modules, missing = build_parser(only)
    if argv and argv[0] in missing:
        print(f"flatminima: error: command {argv[0]!r} is unavailable ({missing[argv[0]]})",
              file=sys.stderr)
        return EXIT_USAGE
    args, extra = parser.parse_known_args(argv)
    # key=value items may also follow the options (argparse takes positionals in one run only).
    if extra and all("=" in e and not e.startswith("-") for e in extra) \
            and isinstance(getattr(args, "items", None), list):
        args.items += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.version:
        from flatminima import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    debug = os.environ.get("FLATMINIMA_DEBUG", "") not in ("", "0")
    from flatminima.experiment.train import TrainingDiverged

    try:
        # A subcommand may route to its own function with set_defaults(run=...); otherwise its
        # module's run(args) handles it.
        func = getattr(args, "run", None)
        if not callable(func):
            func = modules[args.command].run
        return int(func(args) or 0)
    except TrainingDiverged as e:
        if debug:
            raise
        print(f"flatminima {args.command}: diverged: {one_line(e)}", file=sys.stderr)
        return EXIT_DIVERGED
    except _expected_errors() as e:
        if debug:
            raise
        print(f"flatminima {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"flatminima {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
