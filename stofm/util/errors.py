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


class InputError(StalignError, ValueError):
    """A bad value, flag, setting or file content that the user can fix; the message names it and the problem.

    The general class for bad input; a more specific one (``ConfigError``, ``DataPrepError``, ``GenePanelError``,
    ...) is used where one fits."""


class SetupError(StalignError, RuntimeError):
    """The machine or the state of a run cannot do what was asked (no CUDA device, a run folder that cannot be
    resumed, a step that needs an earlier one first); the message says what to do."""


class MissingDependencyError(StalignError, ImportError):
    """An optional package is not installed; the message names it and the ``pip install`` that adds it."""


class NonFiniteLossError(StalignError, RuntimeError):
    """Training produced a NaN/inf loss or gradient; the message names the step and what to do."""


class CoordinateError(InputError):
    """Spot or cell coordinates are missing, misshaped, not finite, or outside the image."""
