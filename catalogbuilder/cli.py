"""The ``catalogbuilder`` command: one sub-command per pipeline stage, each registered by its stage's ``cli`` module."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

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


if __name__ == "__main__":
    sys.exit(main())
