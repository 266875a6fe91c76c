"""``dask-submit``: run a workflow file against a Dask cluster.

    dask-submit WORKFLOW.py [--cluster YAML | --scheduler-file F | --address A | --runner slurm] [--workers N]
                [--device auto|cpu|cuda] [workflow args...] [-- more workflow args...]

The workflow file defines ``main(client, argv) -> int | None`` (:data:`ENTRY_POINT`): ``client`` is the
``distributed.Client`` from :func:`catalogbuilder.cluster.connect`, ``argv`` the arguments dask-submit did not
recognise, in order (everything after a ``--`` is passed on untouched). The file is run on the client only: a
workflow composes functions of the installed package (``catalogbuilder.pipeline``), which is what the workers
import. With ``-h``/``--help`` among the workflow's arguments, ``main(None, argv)`` is called without starting a
cluster (a workflow parses its argv first). With no cluster option a local cluster is started for the run and
closed after it: one GPU worker per GPU (dask-cuda ``LocalCUDACluster``) when dask-cuda is installed and GPUs are
visible, else one CPU worker per core; ``--device cpu`` always starts CPU workers. (The ``dask-submit`` of old
distributed releases was removed in 2019; this one is catalogbuilder's own.)
"""
from __future__ import annotations

import argparse
import logging
import runpy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from distributed import Client

from catalogbuilder.cluster import add_cluster_arguments, connect_from_args
from catalogbuilder.config import EXIT_CONFIG_ERROR, ConfigError

log = logging.getLogger(__name__)

ENTRY_POINT = "main"
HELP_OPTIONS = frozenset({"-h", "--help"})
WorkflowMain = Callable[[Client, list[str]], "int | None"]


class WorkflowError(Exception):
    """A workflow file that cannot be loaded or has no entry point."""


def load_workflow(path: str | Path) -> WorkflowMain:
    """The ``main(client, argv)`` of a workflow file (the file is executed once, on the client)."""
    path = Path(path)
    if not path.is_file():
        raise WorkflowError(f"workflow file not found: {path}")
    if path.suffix != ".py":
        raise WorkflowError(f"a workflow is a Python file (e.g. dr19.py), got {path.name}")
    entry = runpy.run_path(str(path), run_name=f"workflow_{path.stem}").get(ENTRY_POINT)
    if not callable(entry):
        raise WorkflowError(f"{path} defines no {ENTRY_POINT}(client, argv) function")
    return entry


def build_parser(prog: str = "dask-submit", with_workflow: bool = True) -> argparse.ArgumentParser:
    """Options of dask-submit (``with_workflow=False``: those of a workflow file run as a script)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0] if with_workflow else f"Run {prog} on a Dask cluster.",
        allow_abbrev=False,  # an abbreviation must never swallow a workflow's own option
        epilog="Arguments not recognised here, and everything after '--', are passed to the workflow's main().",
    )
    if with_workflow:
        parser.add_argument("workflow", metavar="WORKFLOW.py", help="workflow file defining main(client, argv)")
    add_cluster_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def split_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Our options from ``argv``, and the workflow's arguments (unrecognised ones, then all after ``--``)."""
    if "--" in argv:
        cut = argv.index("--")
        ours, verbatim = argv[:cut], argv[cut + 1 :]
    else:
        ours, verbatim = argv, []
    args, rest = parser.parse_known_args(ours)
    return args, rest + verbatim


def run(entry: WorkflowMain, args: argparse.Namespace, workflow_argv: list[str], prog: str = "dask-submit") -> int:
    """Connect as ``args`` says, run ``entry(client, workflow_argv)`` and return its exit status (2, with one line
    per problem after ``prog:``, for a configuration error: a wrong cluster YAML, or one the workflow let through)."""
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if HELP_OPTIONS & set(workflow_argv):  # the workflow's own --help needs no cluster
        return int(entry(None, workflow_argv) or 0)  # type: ignore[arg-type]
    try:
        with connect_from_args(args) as client:
            log.info("running workflow on %s", client)
            return int(entry(client, workflow_argv) or 0)
    except ConfigError as error:  # the cluster YAML, or a config error the workflow did not report itself
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def script_main(entry: WorkflowMain, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Let a workflow file run as ``python WORKFLOW.py [cluster options] [workflow args]`` too."""
    parser = build_parser(prog=prog or Path(sys.argv[0]).name, with_workflow=False)
    args, workflow_argv = split_arguments(parser, list(sys.argv[1:] if argv is None else argv))
    return run(entry, args, workflow_argv, prog=parser.prog)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dask-submit`` console script."""
    parser = build_parser()
    args, workflow_argv = split_arguments(parser, list(sys.argv[1:] if argv is None else argv))
    try:
        entry = load_workflow(args.workflow)
    except WorkflowError as error:
        parser.error(str(error))
    return run(entry, args, workflow_argv)


def console_main() -> NoReturn:
    """The ``dask-submit`` console script: :func:`main`, then a prompt exit (:func:`catalogbuilder.cli.exit_after`)."""
    from catalogbuilder.cli import exit_after

    exit_after(main)


if __name__ == "__main__":
    console_main()
