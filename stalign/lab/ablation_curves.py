"""Learning curves of the ablation's runs: ``OUT/curves.csv`` (arm, seed, split, step, train loss, val loss) and
``OUT/curves.png`` (one panel per arm, held-out loss against step, one line per seed and split: a colour per seed,
solid on the site split, dashed on the block split).

A row per evaluation of a run (``TrainResult.val_history``; the final scoring of the kept weights of a run that
stopped early, at the same step, is not a point of the curve); its training loss is the mean loss of the steps since
the previous evaluation (a single step's loss is noisy at batch 32).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CURVE_COLUMNS = ("arm", "seed", "split", "step", "train_loss", "val_loss")


def curve_rows(result: Any, *, arm: str, seed: int, split: str) -> list[dict[str, Any]]:
    """The curve of one run: one row per evaluation in ``result.val_history`` (none without it)."""
    losses = np.asarray([(s, v) for s, v in result.losses], dtype=np.float64).reshape(-1, 2)
    rows, last = [], 0
    for ev in getattr(result, "val_history", None) or []:
        step = int(ev["step"])
        if rows and step == rows[-1]["step"]:  # a stopped run scores its kept (best) weights again: not a point
            continue
        window = losses[(losses[:, 0] > last) & (losses[:, 0] <= step), 1]
        rows.append({"arm": arm, "seed": seed, "split": split, "step": step,
                     "train_loss": float(window.mean()) if len(window) else float("nan"),
                     "val_loss": float(ev.get("val_loss", float("nan")))})
        last = step
    return rows


def write_curves(rows: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path | None]:
    """``out/curves.csv`` and, when some run has a held-out loss, ``out/curves.png``; (csv, png or None)."""
    import pandas as pd

    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(list(rows), columns=list(CURVE_COLUMNS))
    csv = out / "curves.csv"
    df.to_csv(csv, index=False)
    df = df[np.isfinite(df["val_loss"].astype(float))]
    if df.empty:
        return csv, None
    return csv, _plot(df, out / "curves.png")


def _plot(df: Any, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(dict.fromkeys(df["arm"]))
    seeds = sorted(set(df["seed"]))
    cols = min(4, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, arm in zip(axes.flat, arms, strict=False):
        for (split, seed), g in df[df["arm"] == arm].groupby(["split", "seed"], sort=True):
            ax.plot(g["step"], g["val_loss"], marker=".", linestyle="-" if split == "site" else "--",
                    color=f"C{seeds.index(seed) % 10}", label=f"{split} seed {seed}")
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("held-out loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(arms):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
