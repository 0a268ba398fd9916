"""Dispatch of a parsed command line with user-facing errors as one line (``--debug`` keeps the traceback);
shared by the ``stofm`` and ``stalign`` commands."""
from __future__ import annotations

import argparse
import sys

#: What a user's input can cause: a one-line message instead of a traceback (OSError: unreadable, unwritable or
#: damaged files, a full disk; the message names the file).
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)


def run_parsed(parser: argparse.ArgumentParser, args: argparse.Namespace, *, prog: str) -> int:
    """Dispatch parsed ``args`` to their ``func``; returns the exit code (1 after a user-facing error)."""
    command = getattr(args, "command", None)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:  # user-facing errors: no traceback
        if getattr(args, "debug", False):
            raise
        message = " ".join(str(err).split()) or type(err).__name__  # one line
        print(f"{prog}{' ' + command if command else ''}: error: {message}", file=sys.stderr)
        return 1
