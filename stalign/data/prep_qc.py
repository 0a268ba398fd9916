"""QC outputs of a prepared slide under ``OUT/qc/``: ``<slide_id>.png`` (thumbnail, tissue mask outline, kept and
dropped spots, with a legend and counts) and ``<slide_id>_dropped.csv`` (each dropped spot: barcode, position,
tissue fraction of its spot crop, reason). Drawn with matplotlib's Agg canvas (no display, no pyplot state)."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stofm.util.output_paths import atomic_write_path, safe_name

if TYPE_CHECKING:
    from stalign.data.tissue_call import TissueCall

QC_DIR = "qc"
KEPT_COLOUR = (0, 192, 0)
DROPPED_COLOUR = (255, 32, 32)
OUTLINE_COLOUR = (0, 80, 255)
#: The picture is at least this wide (small thumbnails are enlarged) and has a band this high above the slide.
MIN_WIDTH_PX, BAND_PX, DPI = 640, 64, 100


def qc_relpaths(slide_id: str) -> tuple[str, str]:
    """The QC picture and the dropped-spot table of a slide, relative to the output folder (the slide id must be
    one plain file name)."""
    name = safe_name(slide_id, "slide_id")
    return f"{QC_DIR}/{name}.png", f"{QC_DIR}/{name}_dropped.csv"


def _marker_px(points: np.ndarray) -> float:
    """Marker diameter in picture pixels: half the median spacing of the spots, 3 to 14 px."""
    if len(points) < 2:
        return 8.0
    from scipy.spatial import cKDTree

    dist, _ = cKDTree(points).query(points, k=2)
    return float(np.clip(0.5 * np.median(dist[:, 1]), 3.0, 14.0))


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def write_qc_picture(path: str | os.PathLike, call: TissueCall, coords_px: np.ndarray, *, slide_id: str) -> None:
    """Draw ``call`` for the slide's spots ``coords_px`` (level-0 px) into the PNG ``path``: the thumbnail enlarged
    to at least ``MIN_WIDTH_PX`` wide, below a band ``BAND_PX`` high holding the title and legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    th, tw = call.thumb.shape[:2]
    scale = max(1.0, MIN_WIDTH_PX / tw)
    width_px, height_px = round(tw * scale), round(th * scale) + BAND_PX
    fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)
    FigureCanvasAgg(fig)
    band = 1.0 - BAND_PX / height_px
    ax = fig.add_axes((0.0, 0.0, 1.0, band))
    ax.imshow(call.thumb, extent=(0, tw, th, 0), interpolation="antialiased")
    if call.mask.any() and not call.mask.all():
        ax.contour(np.arange(tw) + 0.5, np.arange(th) + 0.5, call.mask.astype(np.float32), levels=[0.5],
                   colors=[_hex(OUTLINE_COLOUR)], linewidths=1.2)
    xy = np.asarray(coords_px, dtype=np.float64).reshape(-1, 2) / call.downsample
    size_pt = _marker_px(xy * scale) * 72 / DPI
    kept, dropped = call.keep, ~call.keep
    for sel, colour in ((kept, KEPT_COLOUR), (dropped, DROPPED_COLOUR)):
        if sel.any():
            ax.scatter(xy[sel, 0], xy[sel, 1], s=size_pt ** 2, c=_hex(colour), marker="o", linewidths=0, zorder=3)
    ax.set_xlim(0, tw)
    ax.set_ylim(th, 0)
    ax.axis("off")
    fig.text(0.01, band + 0.62 * (1 - band), f"{slide_id}: tissue rule {call.rule.label()}", fontsize=9,
             va="center", clip_on=True)
    handles = [Line2D([], [], marker="o", ls="", color=_hex(KEPT_COLOUR)),
               Line2D([], [], marker="o", ls="", color=_hex(DROPPED_COLOUR)),
               Line2D([], [], color=_hex(OUTLINE_COLOUR))]
    labels = [f"kept {int(kept.sum())}", f"dropped {int(dropped.sum())}", "image tissue mask"]
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.0, band + 0.25 * (1 - band)), ncol=3,
               fontsize=8, frameon=False, handlelength=1.2)
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")


def write_dropped_table(path: str | os.PathLike, call: TissueCall, coords_px: np.ndarray,
                        barcodes: list[str]) -> int:
    """The dropped spots of ``call`` as CSV (barcode, x_px, y_px, tissue_fraction, reason); returns their number."""
    rows = np.flatnonzero(~call.keep)
    xy = np.asarray(coords_px, dtype=np.float64).reshape(-1, 2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["barcode", "x_px", "y_px", "tissue_fraction", "reason"])
        for i in rows:
            out.writerow([barcodes[i], f"{xy[i, 0]:.1f}", f"{xy[i, 1]:.1f}", f"{call.fraction[i]:.3f}",
                          call.reasons[i]])
    return len(rows)


def write_slide_qc(out_dir: str | os.PathLike, slide_id: str, call: TissueCall, coords_px: np.ndarray,
                   barcodes: list[str]) -> dict[str, Any]:
    """The slide's QC picture and (when spots were dropped) its dropped-spot table under ``out_dir/qc/``; returns
    the manifest's ``tissue`` record of the slide."""
    out = Path(out_dir)
    picture, table = qc_relpaths(slide_id)
    write_qc_picture(out / picture, call, coords_px, slide_id=slide_id)
    record = {**call.record(), "summary": call.describe(), "qc_picture": picture, "dropped_spots": None}
    if (~call.keep).any():
        write_dropped_table(out / table, call, coords_px, barcodes)
        record["dropped_spots"] = table
    return record
