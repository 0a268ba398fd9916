"""Dispatch of a parsed command line, shared by the ``stalign`` and ``stofm`` commands (and the ``data_prep``
scripts).

What a failing command prints:

- a :class:`~stofm.util.errors.StalignError` (bad input, flags, settings or files; a missing optional package; a
  machine that cannot do what was asked): one line ``PROG COMMAND: error: MESSAGE``, exit code 1;
- an ``OSError`` (a missing, unreadable or unwritable file, a full disk; its message names the file) and running
  out of memory (``MemoryError``, torch's ``OutOfMemoryError``): also one line, exit code 1. These come from the
  machine and the files, not from a bug, and are raised by Python and the libraries themselves, so they are not
  wrapped into project errors one by one;
- anything else (a plain ``ValueError``, ``RuntimeError``, ``KeyError``, ...) is a bug: the traceback, then one
  line asking to report it with the traceback and the command line, exit code 1;
- ``--debug``: every error is raised with its traceback; Ctrl-C: ``interrupted``, exit code 130.

Warnings print as one line each, ``PROG COMMAND: warning: MESSAGE``, and a summary of the run's warnings comes
before the exit (:mod:`stofm.util.cli_warnings`).
"""
from __future__ import annotations

import argparse
import sys
import traceback

from stofm.util.cli_warnings import collected_warnings
from stofm.util.errors import StalignError
from stofm.util.output_paths import check_command_outputs

#: What the user or the machine can cause: a one-line message instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (StalignError, OSError, MemoryError)


def _is_user_error(err: BaseException) -> bool:
    # torch.OutOfMemoryError (a RuntimeError) without importing torch
    return isinstance(err, USER_ERRORS) or type(err).__name__ == "OutOfMemoryError"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stalign")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without an install
        return "(version unknown)"


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace, *, prog: str) -> int:
    """Dispatch parsed ``args`` to their ``func``; returns the exit code (1 after an error)."""
    command = getattr(args, "command", None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if command is None else 2
    where = f"{prog}{' ' + command if command else ''}"
    try:
        check_command_outputs(args)  # an --out that is one of the inputs is refused before anything runs
        with collected_warnings(where, debug=getattr(args, "debug", False)):  # one line each, a summary at the end
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if getattr(args, "debug", False):
            raise
        if _is_user_error(err):  # the user's input or the machine: no traceback
            message = " ".join(str(err).split()) or type(err).__name__  # one line
            print(f"{where}: error: {message}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"{where}: error: this is a bug in stalign {_version()} ({type(err).__name__}); please report it "
              "with the traceback above and the command line", file=sys.stderr)
        return 1
