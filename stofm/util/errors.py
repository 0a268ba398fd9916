"""The one error base of ``stalign`` and ``stofm``.

Every error that a user's input, files or settings can cause derives from :class:`StalignError`; the ``stalign``
and ``stofm`` commands print such an error as one line. Anything else is a bug and keeps its traceback. The
classes also derive from the built-in exception a caller would expect (``ValueError`` for bad values, ...), so
``except ValueError`` keeps working. ``stofm``'s own errors derive from :class:`StofmError`, below the base.

The base lives here, in ``stofm.util`` (the layer below both packages), because ``stofm`` never imports ``stalign``.
"""
from __future__ import annotations


class StalignError(Exception):
    """Base of every user-facing error of ``stalign`` and ``stofm``: the message says what to fix."""


class StofmError(StalignError):
    """Base of ``stofm``'s own user-facing errors."""


class NonFiniteLossError(StalignError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step and what to do."""


class CoordinateError(StalignError, ValueError):
    """Spot or cell coordinates are missing, misshaped, not finite, or outside the image."""
