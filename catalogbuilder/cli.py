"""The ``catalogbuilder`` command: one sub-command per pipeline stage, each registered by its stage's ``cli`` module."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from catalogbuilder import __version__
from catalogbuilder.config import EXIT_CONFIG_ERROR, ConfigError

# Each module defines ``register(subparsers)``, adding its sub-commands with ``set_defaults(func=...)``;
# ``func(args) -> int`` is the exit status. Heavy imports stay inside ``func`` so ``--help`` is instant.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "catalogbuilder.store.cli",
    "catalogbuilder.inference.cli",
    "catalogbuilder.training.cli",
    "catalogbuilder.photometric.cli",
    "catalogbuilder.crossmatch.cli",
    "catalogbuilder.release.cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every stage's sub-commands."""
    parser = argparse.ArgumentParser(prog="catalogbuilder", description=__doc__)
    parser.add_argument("--version", action="version", version=f"catalogbuilder {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``catalogbuilder`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ConfigError as error:  # a cluster YAML or a model's catalogbuilder.yaml: one line per problem, exit 2
        print(f"catalogbuilder {args.command}: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def exit_after(command: Callable[[], int | None]) -> NoReturn:
    """Run a console script's ``command`` and end the process with its exit status, skipping the interpreter's
    teardown.

    Tearing down an interpreter that imported torch and Dask and held a model took 0.1-0.7 s more after
    ``catalogbuilder infer`` on the full-size APOGEE Net III (garbage collection, module clean-up, C++ static
    destructors), time a user waits for that changes nothing: by then the commands have committed every store write
    and closed every cluster they started (``with`` blocks). What a library leaves for the end of the process still
    runs: the exit handlers and ``weakref.finalize`` callbacks (e.g. a Dask scheduler removing its scheduler file;
    logging's flush), and standard streams are flushed. ``SystemExit`` (argparse's usage errors, ``--help``) gives
    its status; an uncaught exception ends the ordinary way (traceback, status 1)."""
    try:
        status = command()
    except SystemExit as request:
        status = request.code
    if status is not None and not isinstance(status, int):  # sys.exit("message"): printed, status 1
        print(status, file=sys.stderr)
        status = 1
    atexit._run_exitfuncs()  # what the interpreter would run first at exit (a CPython function since 3.0)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing left to deliver
            stream.flush()
    os._exit(status or 0)


def console_main() -> NoReturn:
    """The ``catalogbuilder`` console script: :func:`main`, then :func:`exit_after`'s prompt exit."""
    exit_after(main)


if __name__ == "__main__":
    console_main()
