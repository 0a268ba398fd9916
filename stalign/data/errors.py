"""Errors raised on bad input anywhere in ``stalign.data``.

Every error derives from :class:`DataPrepError` (a ``ValueError``, an ``InputError`` of ``stofm.util.errors``) and
its message names the file and the problem, so a user can fix the input without reading a traceback. Coordinate
problems raise :class:`CoordinateError`, the one class shared with ``stofm`` (``stofm.util.errors``, re-exported
here; not a ``DataPrepError``: catch both where a slide's bad input is collected).
"""
from __future__ import annotations

from collections.abc import Iterable

from stofm.util.errors import CoordinateError, InputError

__all__ = ["BarcodeError", "CoordinateError", "DataPrepError", "ExpressionError", "GeneNameError", "PixelSizeError",
           "SlideError", "examples"]


class DataPrepError(InputError):
    """Bad input to data preparation: the message names the file and the problem."""


class SlideError(DataPrepError):
    """A slide image cannot be opened or read (unsupported, truncated, corrupt)."""


class PixelSizeError(DataPrepError):
    """No trustworthy pixel size (µm/px) for a slide, or an invalid one was given."""


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
