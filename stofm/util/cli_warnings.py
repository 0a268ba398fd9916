"""Warnings of a ``stalign``/``stofm`` command as one clean line each, collected per run.

While a command runs, ``warnings.formatwarning`` makes Python print ``PROG COMMAND: warning: MESSAGE`` on stderr (the message on
one line; no Python source line, no file:line); a warning that is not stalign's or stofm's own names its category
and package, e.g. ``(FutureWarning from anndata)``. A message repeated during the run is printed once. At the end,
``PROG COMMAND: N warnings (D distinct): ...`` lists the distinct ones with their counts. ``--debug`` keeps Python's
own format (with the source line).
"""
from __future__ import annotations

import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

#: Packages whose warnings are written for the user (their message says what to do): no category/package suffix.
OWN_PACKAGES = ("stalign", "stofm", "data_prep")


def _package(filename: str) -> str:
    """The top-level package a warning was raised from (``site-packages/<pkg>/...`` or this checkout's)."""
    parts = Path(filename).parts
    for marker in ("site-packages", "dist-packages"):
        if marker in parts and parts.index(marker) + 1 < len(parts):
            return parts[parts.index(marker) + 1].removesuffix(".py")
    for own in OWN_PACKAGES:
        if own in parts:
            return own
    return Path(filename).stem


def one_line(message: Warning | str, category: type[Warning], filename: str) -> str:
    """The warning's text on one line, with its category and package when it is not stalign's or stofm's own."""
    text = " ".join(str(message).split()) or category.__name__
    package = _package(filename)
    if package in OWN_PACKAGES:
        return text
    return f"{text} ({category.__name__} from {package})"


class WarningLog:
    """The warnings of one command run: formatted as one line (each distinct message once), counted."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.counts: Counter[str] = Counter()

    def format(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
               line: str | None = None) -> str:
        """A ``warnings.formatwarning`` replacement: the one line, or nothing for a message already shown."""
        text = one_line(message, category, filename)
        self.counts[text] += 1
        return f"{self.where}: warning: {text}\n" if self.counts[text] == 1 else ""

    def summary(self) -> str | None:
        """``N warnings (D distinct)`` and the distinct messages with their counts; None without warnings."""
        if not self.counts:
            return None
        total = sum(self.counts.values())
        head = f"{self.where}: {total} warning{'s' * (total != 1)}"
        if len(self.counts) == 1 and total == 1:
            return f"{head}: {next(iter(self.counts))}"
        lines = [f"{head} ({len(self.counts)} distinct):"]
        lines += [f"  - {text}" + (f" (x{n})" if n > 1 else "") for text, n in self.counts.items()]
        return "\n".join(lines)


@contextmanager
def collected_warnings(where: str, *, debug: bool = False, stream: TextIO | None = None) -> Iterator[WarningLog]:
    """Inside, warnings print as one line each (``debug``: as Python prints them); on leaving, the summary on
    ``stream`` (stderr). Only the format changes: code that records warnings (``pytest.warns``,
    ``catch_warnings(record=True)``) still gets them."""
    log = WarningLog(where)
    if debug:
        yield log
        return
    saved = warnings.formatwarning
    warnings.formatwarning = log.format
    try:
        yield log
    finally:
        warnings.formatwarning = saved
        text = log.summary()
        if text:
            print(text, file=stream or sys.stderr, flush=True)
