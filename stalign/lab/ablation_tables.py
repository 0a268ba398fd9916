"""The ablation's markdown tables (:mod:`stalign.lab.ablation` rows -> one table per split, mean ± std over
seeds per method), with the compute each arm took (steps run, best step, seconds) beside its measures."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: measure columns (3 decimals) and compute columns (whole numbers), in table order
COLUMNS = ("recall@1", "recall@10", "r_spot", "r_context", "mse_spot", "mse_context", "ridge_r_spot",
           "ridge_r_context", "domain_ari", "domain_nmi")
COMPUTE = ("steps", "best_step", "seconds")

#: the splits' titles, in table order
SPLIT_TITLES = {"site": "Held-out site (every slide of an unseen site)",
                "block": "Within-slide held-out blocks (niche-wide margin)"}


def summarise(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per split (``site`` first): mean ± std over seeds per method (r/MSE: zero-shot
    retrieval for arms, the predictions for baselines; ridge_*: few-shot ridge on the arm's image embeddings;
    steps / best_step / seconds: the arm's run, training and scoring)."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    if "split" not in df.columns or df["split"].isna().all():
        return _table(df)
    order = list(SPLIT_TITLES)
    parts = []
    for split in sorted(df["split"].dropna().unique(), key=lambda x: (order + [x]).index(x)):
        parts.append(f"**{SPLIT_TITLES.get(split, split)}**\n\n" + _table(df[df["split"] == split]))
    return "\n\n".join(parts)


def _table(df: Any) -> str:
    cols = [c for c in (*COLUMNS, *COMPUTE) if c in df.columns]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for method, g in df.groupby("method", sort=False):
        cells = []
        for c in cols:
            v = g[c].dropna()
            digits = 0 if c in COMPUTE else 3
            cells.append("–" if v.empty else f"{v.mean():.{digits}f} ± {v.std(ddof=0):.{digits}f}")
        lines.append(f"| {method} | {len(g)} | " + " | ".join(cells) + " |")
    if "chance@1" in df.columns and df["chance@1"].notna().any():
        lines.append(f"\nchance: recall@1 {df['chance@1'].mean():.3f}, recall@10 {df['chance@10'].mean():.3f} "
                     "(k / held-out spots)")
    return "\n".join(lines)
