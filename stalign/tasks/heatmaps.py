"""PNG maps over the H&E thumbnail: predicted expression per gene (spot circles or an interpolated grid),
and categorical maps (domains) drawn with the same spot geometry."""
from __future__ import annotations

from collections.abc import Sequence
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


def new_axes(thumbnail: np.ndarray | None, coords_thumb: np.ndarray, *, width_in: float = 6.0):
    """Figure and axes in thumbnail pixel coordinates (y down), with the thumbnail drawn when given."""
    plt = _pyplot()
    if thumbnail is not None:
        h, w = thumbnail.shape[:2]
    else:
        w = float(coords_thumb[:, 0].max() + coords_thumb[:, 0].min()) or 1.0
        h = float(coords_thumb[:, 1].max() + coords_thumb[:, 1].min()) or 1.0
    fig, ax = plt.subplots(figsize=(width_in, max(width_in * h / max(w, 1), 1.5)))
    if thumbnail is not None:
        ax.imshow(thumbnail, extent=(0, w, h, 0))
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_axis_off()
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


def _grid(values: np.ndarray, coords_thumb: np.ndarray, shape: tuple[int, int], max_dist: float) -> np.ndarray:
    """Values interpolated (linear) onto a (h, w) grid, masked farther than ``max_dist`` from any spot."""
    from scipy.interpolate import griddata
    from scipy.spatial import cKDTree

    h, w = shape
    gy, gx = np.mgrid[0:h, 0:w]
    pts = np.column_stack([gx.ravel() + 0.5, gy.ravel() + 0.5])
    grid = griddata(coords_thumb, values, pts, method="linear") if len(coords_thumb) >= 3 else None
    near = griddata(coords_thumb, values, pts, method="nearest")
    grid = near if grid is None else np.where(np.isnan(grid), near, grid)
    far = cKDTree(coords_thumb).query(pts)[0] > max_dist
    return np.ma.masked_array(grid, far).reshape(h, w)


SCALE_BAR_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def draw_scale_bar(ax: Any, um_per_thumb_px: float, width_thumb_px: float) -> float:
    """A scale bar of a round length (about a fifth of the width) at the bottom left; returns its length in µm."""
    target = width_thumb_px * um_per_thumb_px / 5
    length = min(SCALE_BAR_UM, key=lambda v: abs(np.log(v / target)))
    px = length / um_per_thumb_px
    y0, y1 = ax.get_ylim()  # y down: y0 is the bottom
    x = 0.04 * width_thumb_px
    y = y0 - 0.05 * abs(y0 - y1)
    ax.plot([x, x + px], [y, y], color="white", linewidth=4, solid_capstyle="butt")
    ax.plot([x, x + px], [y, y], color="black", linewidth=1.5, solid_capstyle="butt")
    label = f"{length / 1000:g} mm" if length >= 1000 else f"{length} µm"
    ax.text(x + px / 2, y - 0.02 * abs(y0 - y1), label, ha="center", va="bottom", fontsize=8, color="black",
            bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0, "pad": 1})
    return float(length)


def heatmap_limits(*arrays: np.ndarray) -> list[tuple[float, float]]:
    """Per gene (column), the 1st-99th percentile range over all ``arrays`` together: one colour scale for
    maps that are compared (predicted vs measured)."""
    stacked = np.concatenate([np.asarray(a, np.float64) for a in arrays])
    return [(float(np.nanpercentile(c, 1)), float(np.nanpercentile(c, 99))) for c in stacked.T]


def plot_gene_heatmaps(values: np.ndarray, genes: Sequence[str], coords_px: np.ndarray, out_dir: str | Path, *,
                       thumbnail: np.ndarray | None = None, downsample: float = 1.0,
                       spot_diameter_px: float | None = None, mode: str = "spots", panel: bool = False,
                       cmap: str = "magma", alpha: float = 0.75, dpi: int = 120, prefix: str = "",
                       label: str = "predicted expression", limits: Sequence[tuple[float, float]] | None = None,
                       um_per_px: float | None = None) -> list[Path]:
    """Heat maps of ``values`` (N, G) over the thumbnail: one PNG per gene, or one panel PNG.

    ``coords_px`` are level-0 (x, y) spot centres, ``downsample`` level-0 px per thumbnail px (as
    ``Slide.thumbnail`` returns), ``mode`` "spots" (circles of ``spot_diameter_px``) or "grid" (interpolated);
    ``label`` names the colour bar; ``limits`` (vmin, vmax) per gene (default: its 1st-99th percentile; share
    them with :func:`heatmap_limits` to compare maps); ``um_per_px`` (level 0) adds a scale bar.
    """
    plt = _pyplot()
    values = np.asarray(values, np.float64)
    coords = np.asarray(coords_px, np.float64).reshape(-1, 2) / float(downsample)
    if values.ndim != 2 or values.shape != (len(coords), len(genes)):
        raise InputError(f"values must be (n_spots={len(coords)}, n_genes={len(genes)}), got {values.shape}")
    if mode not in ("spots", "grid"):
        raise InputError(f"heat map mode must be 'spots' or 'grid', got {mode!r}")
    if len(coords) == 0:
        raise InputError("no spots to draw")
    if spot_diameter_px is None:
        from scipy.spatial import cKDTree

        spot_diameter_px = float(cKDTree(coords).query(coords, k=2)[0][:, 1].min()) * downsample if len(
            coords) > 1 else 10.0 * downsample
    diameter = float(spot_diameter_px) / float(downsample)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shape = thumbnail.shape[:2] if thumbnail is not None else (
        int(np.ceil(coords[:, 1].max() + diameter)), int(np.ceil(coords[:, 0].max() + diameter)))

    if limits is not None and len(limits) != len(genes):
        raise InputError(f"{len(limits)} colour limits for {len(genes)} genes")
    stems = file_stems(genes, "gene")  # distinct: CD8/A and CD8_A never share a file

    def draw(ax: Any, g: int) -> Any:
        v = values[:, g]
        lo, hi = limits[g] if limits is not None else (np.nanpercentile(v, 1), np.nanpercentile(v, 99))
        if um_per_px:
            draw_scale_bar(ax, float(um_per_px) * float(downsample), shape[1])
        if mode == "spots":
            return draw_spots(ax, coords, diameter, values=v, cmap=cmap, alpha=alpha, vmin=lo, vmax=hi)
        return ax.imshow(_grid(v, coords, shape, diameter), cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                         extent=(0, shape[1], shape[0], 0))

    written = []
    if panel:
        n = len(genes)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * shape[0] / max(shape[1], 1) + 0.4),
                                 squeeze=False)
        for i, ax in enumerate(axes.ravel()):
            ax.set_axis_off()
            if i >= n:
                continue
            if thumbnail is not None:
                ax.imshow(thumbnail, extent=(0, shape[1], shape[0], 0))
            ax.set_xlim(0, shape[1])
            ax.set_ylim(shape[0], 0)
            fig.colorbar(draw(ax, i), ax=ax, fraction=0.046, pad=0.02)
            ax.set_title(str(genes[i]), fontsize=9)
        path = out_dir / f"{prefix}panel.png"
        with atomic_write_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return [path]
    for g, gene in enumerate(genes):
        fig, ax = new_axes(thumbnail, coords)
        fig.colorbar(draw(ax, g), ax=ax, fraction=0.046, pad=0.02, label=label)
        ax.set_title(str(gene))
        path = out_dir / f"{prefix}{stems[g]}.png"
        with atomic_write_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
