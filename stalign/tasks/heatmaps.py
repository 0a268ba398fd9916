"""PNG maps over the H&E thumbnail: predicted expression per gene (spot circles or an interpolated grid),
and categorical maps (domains) drawn with the same spot geometry."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path, file_stems


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _frame(ax: Any, thumbnail: np.ndarray | None, shape: tuple[float, float]) -> None:
    """``ax`` in thumbnail pixel coordinates (y down) over ``shape`` (h, w), with the thumbnail drawn when given."""
    h, w = shape
    if thumbnail is not None:
        ax.imshow(thumbnail, extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()


def new_axes(thumbnail: np.ndarray | None, coords_thumb: np.ndarray, *, width_in: float = 6.0,
             shape: tuple[float, float] | None = None):
    """Figure and axes in thumbnail pixel coordinates (y down) over ``shape`` (h, w; default: the thumbnail's, else
    the spots' extent), with the thumbnail drawn when given."""
    if shape is None:
        shape = thumbnail.shape[:2] if thumbnail is not None else (
            float(coords_thumb[:, 1].max() + coords_thumb[:, 1].min()) or 1.0,
            float(coords_thumb[:, 0].max() + coords_thumb[:, 0].min()) or 1.0)
    h, w = shape
    fig, ax = _pyplot().subplots(figsize=(width_in, max(width_in * h / max(w, 1), 1.5)))
    _frame(ax, thumbnail, shape)
    return fig, ax


def draw_spots(ax: Any, coords_thumb: np.ndarray, diameter_thumb: float, *, values: np.ndarray | None = None,
               colors: Any = None, cmap: str = "magma", alpha: float = 0.8, vmin: float | None = None,
               vmax: float | None = None):
    """Circles of ``diameter_thumb`` (thumbnail px) coloured by ``values`` (with ``cmap``) or ``colors``."""
    from matplotlib.collections import EllipseCollection

    d = np.full(len(coords_thumb), float(diameter_thumb))
    coll = EllipseCollection(d, d, np.zeros(len(d)), units="xy", offsets=coords_thumb,
                             offset_transform=ax.transData, alpha=alpha, linewidths=0)
    if values is not None:
        coll.set_array(np.asarray(values, np.float64))
        coll.set_cmap(cmap)
        coll.set_clim(vmin, vmax)
    else:
        coll.set_facecolor(colors)
    ax.add_collection(coll)
    return coll


SCALE_BAR_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def _bar_box(corner: str, length_px: float, shape: tuple[int, int]) -> tuple[slice, slice, float, float]:
    """The thumbnail pixels a bar (and its label) in ``corner`` covers, and the bar's left end and height."""
    h, w = shape
    margin, box_h = 0.04 * w, 0.09 * h
    x = margin if corner.endswith("left") else w - margin - length_px
    y = h - 0.05 * h if corner.startswith("bottom") else 0.05 * h + box_h * 0.7
    rows = slice(max(int(y - box_h * 0.8), 0), min(int(y + 0.02 * h) + 1, h))
    cols = slice(max(int(x - 0.02 * w), 0), min(int(x + length_px + 0.02 * w) + 1, w))
    return rows, cols, x, y


def draw_scale_bar(ax: Any, um_per_thumb_px: float, width_thumb_px: float, busy: np.ndarray | None = None) -> float:
    """A scale bar of a round length (about a fifth of the width); returns its length in µm.

    It goes into the first corner (bottom left, bottom right, top left, top right) where it covers no pixel of
    ``busy`` (the (h, w) thumbnail pixels showing tissue or values), else below the picture, outside it."""
    target = width_thumb_px * um_per_thumb_px / 5
    length = min(SCALE_BAR_UM, key=lambda v: abs(np.log(v / target)))
    px = length / um_per_thumb_px
    y_bottom, y_top = ax.get_ylim()  # y down: the first is the bottom
    shape = (int(round(abs(y_bottom - y_top))), int(round(width_thumb_px)))
    label = f"{length / 1000:g} mm" if length >= 1000 else f"{length} µm"
    style = {"ha": "center", "va": "bottom", "fontsize": 8, "color": "black",
             "bbox": {"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1}}
    for corner in ("bottom left", "bottom right", "top left", "top right"):
        rows, cols, x, y = _bar_box(corner, px, shape)
        if busy is None or not busy[rows, cols].any():
            ax.plot([x, x + px], [y, y], color="white", linewidth=4, solid_capstyle="butt")
            ax.plot([x, x + px], [y, y], color="black", linewidth=1.5, solid_capstyle="butt")
            ax.text(x + px / 2, y - 0.02 * shape[0], label, **style)
            return float(length)
    trans = ax.get_xaxis_transform()  # x in data (thumbnail px), y in axes fractions: below the picture
    x = 0.04 * width_thumb_px
    ax.plot([x, x + px], [-0.04, -0.04], color="black", linewidth=1.5, solid_capstyle="butt", transform=trans,
            clip_on=False)
    ax.text(x + px / 2, -0.035, label, transform=trans, clip_on=False, **style)
    return float(length)


def heatmap_limits(*arrays: np.ndarray) -> list[tuple[float, float]]:
    """Per gene (column), the 1st-99th percentile range over all ``arrays`` together: one colour scale for
    maps that are compared (predicted vs measured)."""
    stacked = np.concatenate([np.asarray(a, np.float64) for a in arrays])
    return [(float(np.nanpercentile(c, 1)), float(np.nanpercentile(c, 99))) for c in stacked.T]


@dataclass
class MapCanvas:
    """Where a gene's values are drawn: spot centres and diameter in thumbnail px, the thumbnail (h, w), its tissue
    mask (grid maps stop at the tissue's edge) and the pixels a scale bar must not cover."""

    coords: np.ndarray
    diameter: float
    shape: tuple[int, int]
    thumbnail: np.ndarray | None = None
    mode: str = "spots"
    tissue: np.ndarray | None = None
    um_per_thumb_px: float | None = None
    layout: Any = None  # the grid maps' pixel weights (stalign.tasks.heatmap_grid.GridLayout), shared by all genes

    def busy(self, drawn: np.ndarray | None) -> np.ndarray:
        """Pixels showing tissue or values: drawn grid pixels, else the spots' squares."""
        out = np.zeros(self.shape, bool) if self.tissue is None else self.tissue.copy()
        if drawn is not None:
            return out | drawn
        r = max(self.diameter / 2, 1.0)
        h, w = self.shape
        for x, y in self.coords:
            out[max(int(y - r), 0):min(int(y + r) + 1, h), max(int(x - r), 0):min(int(x + r) + 1, w)] = True
        return out


def make_canvas(coords_px: np.ndarray, *, thumbnail: np.ndarray | None, downsample: float,
                spot_diameter_px: float | None, mode: str, um_per_px: float | None = None) -> MapCanvas:
    """A :class:`MapCanvas` for level-0 ``coords_px`` over ``thumbnail`` (``downsample`` level-0 px per its px)."""
    from stalign.tasks.heatmap_grid import grid_layout, spot_pitch, thumbnail_tissue

    coords = np.asarray(coords_px, np.float64).reshape(-1, 2) / float(downsample)
    if mode not in ("spots", "grid"):
        raise InputError(f"heat map mode must be 'spots' or 'grid', got {mode!r}")
    if len(coords) == 0:
        raise InputError("no spots to draw")
    diameter = float(spot_diameter_px) / float(downsample) if spot_diameter_px else (spot_pitch(coords) or 10.0)
    shape = thumbnail.shape[:2] if thumbnail is not None else (
        int(np.ceil(coords[:, 1].max() + diameter)), int(np.ceil(coords[:, 0].max() + diameter)))
    shape = (int(shape[0]), int(shape[1]))
    tissue = thumbnail_tissue(thumbnail) if mode == "grid" else None
    return MapCanvas(coords, diameter, shape, thumbnail, mode, tissue,
                     float(um_per_px) * float(downsample) if um_per_px else None,
                     grid_layout(coords, shape, spot_diameter=diameter, tissue=tissue) if mode == "grid" else None)


def draw_values(ax: Any, canvas: MapCanvas, v: np.ndarray, *, vmin: float, vmax: float, cmap: str = "magma",
                alpha: float = 0.75) -> Any:
    """One gene's values on ``ax`` (spots or the tissue-clipped grid) and the scale bar; returns the mappable."""
    if canvas.mode == "spots":
        drawn, mappable = None, draw_spots(ax, canvas.coords, canvas.diameter, values=v, cmap=cmap, alpha=alpha,
                                           vmin=vmin, vmax=vmax)
    else:
        image = canvas.layout.image(v)
        drawn = ~np.ma.getmaskarray(image)
        mappable = ax.imshow(image, cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax, interpolation="nearest",
                             extent=(0, canvas.shape[1], canvas.shape[0], 0))
    if canvas.um_per_thumb_px:
        draw_scale_bar(ax, canvas.um_per_thumb_px, canvas.shape[1], canvas.busy(drawn))
    return mappable


def colour_bar_label(label: str, units: str | None) -> str:
    """The colour bar's title: what is drawn, and in which units."""
    return f"{label}\n[{units}]" if units else label


def gene_figure(canvas: MapCanvas, v: np.ndarray, title: str, *, limits: tuple[float, float] | None = None,
                cmap: str = "magma", alpha: float = 0.75, label: str = "predicted expression",
                units: str | None = None):
    """The figure of one gene's map with its colour bar; returns (figure, axes)."""
    lo, hi = limits if limits is not None else (np.nanpercentile(v, 1), np.nanpercentile(v, 99))
    fig, ax = new_axes(canvas.thumbnail, canvas.coords, shape=canvas.shape)
    mappable = draw_values(ax, canvas, v, vmin=lo, vmax=hi, cmap=cmap, alpha=alpha)
    fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.02, label=colour_bar_label(label, units))
    ax.set_title(title)
    return fig, ax


def save_figure(fig: Any, path: Path, dpi: int) -> Path:
    """Write ``fig`` to ``path`` whole or not at all (a temporary renamed into place) and close it."""
    with atomic_write_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_gene_heatmaps(values: np.ndarray, genes: Sequence[str], coords_px: np.ndarray, out_dir: str | Path, *,
                       thumbnail: np.ndarray | None = None, downsample: float = 1.0,
                       spot_diameter_px: float | None = None, mode: str = "spots", panel: bool = False,
                       cmap: str = "magma", alpha: float = 0.75, dpi: int = 120, prefix: str = "",
                       label: str = "predicted expression", limits: Sequence[tuple[float, float]] | None = None,
                       um_per_px: float | None = None, units: str | None = None) -> list[Path]:
    """Heat maps of ``values`` (N, G) over the thumbnail: one PNG per gene, or one panel PNG.

    ``coords_px`` are level-0 (x, y) spot centres, ``downsample`` level-0 px per thumbnail px (as
    ``Slide.thumbnail`` returns), ``mode`` "spots" (circles of ``spot_diameter_px``) or "grid" (interpolated
    between the spots and clipped to the tissue: :mod:`stalign.tasks.heatmap_grid`); ``label`` and ``units``
    title the colour bar; ``limits`` (vmin, vmax) per gene (default: its 1st-99th percentile; share them with
    :func:`heatmap_limits` to compare maps); ``um_per_px`` (level 0) adds a scale bar where it hides nothing.
    """
    plt = _pyplot()
    values = np.asarray(values, np.float64)
    n = len(np.asarray(coords_px).reshape(-1, 2))
    if values.ndim != 2 or values.shape != (n, len(genes)):
        raise InputError(f"values must be (n_spots={n}, n_genes={len(genes)}), got {values.shape}")
    if limits is not None and len(limits) != len(genes):
        raise InputError(f"{len(limits)} colour limits for {len(genes)} genes")
    canvas = make_canvas(coords_px, thumbnail=thumbnail, downsample=downsample, spot_diameter_px=spot_diameter_px,
                         mode=mode, um_per_px=um_per_px)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = file_stems(genes, "gene")  # distinct: CD8/A and CD8_A never share a file
    limits = heatmap_limits(values) if limits is None else limits

    if panel:
        h, w = canvas.shape
        cols = int(np.ceil(np.sqrt(len(genes))))
        rows = int(np.ceil(len(genes) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * h / max(w, 1) + 0.4), squeeze=False)
        for i, ax in enumerate(axes.ravel()):
            ax.set_axis_off()
            if i >= len(genes):
                continue
            _frame(ax, thumbnail, canvas.shape)
            lo, hi = limits[i]
            fig.colorbar(draw_values(ax, canvas, values[:, i], vmin=lo, vmax=hi, cmap=cmap, alpha=alpha), ax=ax,
                         fraction=0.046, pad=0.02, label=units or "")
            ax.set_title(str(genes[i]), fontsize=9)
        return [save_figure(fig, out_dir / f"{prefix}panel.png", dpi)]
    return [save_figure(gene_figure(canvas, values[:, g], str(gene), limits=limits[g], cmap=cmap, alpha=alpha, label=label,
                              units=units)[0], out_dir / f"{prefix}{stems[g]}.png", dpi)
            for g, gene in enumerate(genes)]
