"""Errors raised on bad input anywhere in ``stalign.data``.

Every error derives from :class:`DataPrepError` (a ``ValueError``) and its message names the file and the
problem, so a user can fix the input without reading a traceback.
"""
from __future__ import annotations

from collections.abc import Iterable


class DataPrepError(ValueError):
    """Bad input to data preparation: the message names the file and the problem."""


class SlideError(DataPrepError):
    """A slide image cannot be opened or read (unsupported, truncated, corrupt)."""


class PixelSizeError(DataPrepError):
    """No trustworthy pixel size (µm/px) for a slide, or an invalid one was given."""


class CoordinateError(DataPrepError):
    """Spot coordinates are missing, not finite, or outside the image."""


class BarcodeError(DataPrepError):
    """Spot barcodes do not match between files, or are duplicated."""


class ExpressionError(DataPrepError):
    """Expression values are empty, NaN/inf or negative."""


class GeneNameError(ExpressionError):
    """Gene names are duplicated or missing."""


def examples(items: Iterable[object], n: int = 5) -> str:
    """``'a', 'b', 'c' (and 7 more)`` for error messages."""
    items = list(items)
    shown = ", ".join(repr(str(x)) for x in items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")
