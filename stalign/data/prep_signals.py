"""SIGTERM during ``stalign prep``: the handler raises :class:`Terminated`, so a stopped prep unwinds like an
exception (temporary shard removed, workers shut down), and the prep checks again at every batch and slide in
case that exception was raised where Python drops it."""
from __future__ import annotations

from typing import Any


class Terminated(SystemExit):
    """SIGTERM during a prep: unwinds like an exception so temporaries are removed and workers shut down."""


SIGNALLED: list[int] = []  # SIGTERMs received during this prep


def raise_terminated(signum: int, frame: Any) -> None:
    SIGNALLED.append(signum)
    raise Terminated(128 + signum)


def check_terminated() -> None:
    """Raise :class:`Terminated` again if a SIGTERM came: raised by the handler inside a weakref callback or a
    ``__del__`` (garbage collection of a finished future), the exception is printed and lost there."""
    if SIGNALLED:
        raise Terminated(128 + SIGNALLED[-1])
