"""The ``stalign`` command line: one entry point, one module per subcommand under ``stalign.commands``.

Each command module defines ``register(subparsers)`` which adds its parser(s) and sets ``func`` to a
callable taking the parsed ``argparse.Namespace`` and returning an exit code.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from stofm.util.cli_errors import run_parsed

# Order is the order shown in ``stalign --help``.
COMMAND_MODULES = (
    "stalign.commands.data",      # data fetch / data synth
    "stalign.commands.prep",      # prep
    "stalign.commands.pretrain_stofm",
    "stalign.commands.train",
    "stalign.commands.predict",
    "stalign.commands.retrieve",
    "stalign.commands.domains",
    "stalign.commands.fewshot",
    "stalign.commands.bench",
    "stalign.commands.heatmaps",
    "stalign.commands.hub",       # push
    "stalign.commands.demo",      # make demo
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="stalign",
        description="Predict spatial gene expression from H&E slides (ST-Align + SToFM).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a command whose module is not there yet
            if err.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _version() -> str:
    from stalign import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Run ``stalign`` with ``argv`` (defaults to ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    return run_parsed(parser, parser.parse_args(argv), prog="stalign")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
