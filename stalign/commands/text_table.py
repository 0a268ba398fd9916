"""Plain-text tables for terminal reports (the demo's result tables)."""
from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table with one column per key of the first row."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, width)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in width]), *(line(r) for r in cells)])
