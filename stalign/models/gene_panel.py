"""One gene-panel error and one check, shared by the model, the reference banks and the tasks."""
from __future__ import annotations

from collections.abc import Sequence

from stofm.util.errors import InputError


class GenePanelError(InputError):
    """Expression over one gene panel used where another one was expected, or genes missing from a panel."""


def check_gene_panel(expected: Sequence[str], got: Sequence[str], *, what: str, owner: str = "expected",
                     hint: str = "") -> None:
    """Raise ``GenePanelError`` unless ``got`` (``what``'s genes) is exactly the panel ``expected`` (of ``owner``),
    same genes in the same order; the message counts and names missing and extra genes, then ``hint``."""
    expected, got = [str(g) for g in expected], [str(g) for g in got]
    if expected == got:
        return
    have, want = set(got), set(expected)
    missing = [g for g in expected if g not in have]
    extra = [g for g in got if g not in want]
    detail = (f"{len(missing)} of {owner}'s genes missing (e.g. {missing[:5]}), {len(extra)} extra (e.g. {extra[:5]})"
              if missing or extra else "the same genes in another order")
    raise GenePanelError(f"{what} has another gene panel (a {len(got)}-gene panel; {owner}: {len(expected)} genes): "
                         f"{detail}" + (f"; {hint}" if hint else ""))
