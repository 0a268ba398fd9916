"""Micro scale: cut a slide into sub-slices of about ``cells_per_tile`` cells (SToFM's square tiling).

Coordinates are first scaled so that the slide's diameter is 100 units (SToFM scales the slice diagonal to
100; we use the largest pairwise distance, which equals the bounding-box diagonal of a full rectangular slide
but, unlike the axis-aligned box, does not change when the slide is rotated). The slide is then cut into a
square grid sized for ``cells_per_tile`` cells per tile on average; tiles with more than ``max_cells`` cells
are split into four quadrants recursively; empty tiles are dropped. Every cell lands in exactly one tile.
"""
from __future__ import annotations

import math

import numpy as np

from stofm.util.errors import CoordinateError, InputError
from stofm.util.geometry import units_per_um


def check_coords(coords: np.ndarray, *, what: str = "coordinates") -> np.ndarray:
    """``coords`` as a float64 (N, 2) array; raises ``CoordinateError`` on a bad shape or NaN/inf values."""
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise CoordinateError(f"{what} must have shape (N, 2), got {arr.shape}")
    if arr.shape[0] == 0:
        raise CoordinateError(f"{what} are empty (no cells)")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise CoordinateError(f"{what} contain NaN/inf values for {int(bad.sum())} of {arr.shape[0]} cells "
                              f"(first at index {int(np.flatnonzero(bad)[0])})")
    return arr


def scale_to_diameter(coords: np.ndarray) -> tuple[np.ndarray, float]:
    """Coordinates shifted to start at 0, scaled by ``units_per_um`` (slide diameter 100); returns (xy, factor)."""
    arr = check_coords(coords)
    factor = units_per_um(arr)
    return (arr - arr.min(axis=0)) * factor, factor


def tile_slide(coords: np.ndarray, *, cells_per_tile: int = 1000, max_cells: int | None = None,
               scale: bool = True) -> list[np.ndarray]:
    """Index arrays of the sub-slices of a slide (each sorted; together a partition of ``range(N)``).

    ``cells_per_tile`` sets the grid (average cells per tile); ``max_cells`` (default 1.5 × cells_per_tile)
    bounds every tile: larger tiles are split into quadrants recursively, then, for piles of cells at the same
    position, into chunks.
    """
    if cells_per_tile < 1:
        raise InputError(f"cells_per_tile must be >= 1, got {cells_per_tile}")
    limit = int(max_cells) if max_cells is not None else max(1, int(math.ceil(1.5 * cells_per_tile)))
    if limit < 1:
        raise InputError(f"max_cells must be >= 1, got {max_cells}")
    xy = scale_to_diameter(coords)[0] if scale else check_coords(coords) - check_coords(coords).min(axis=0)
    n = len(xy)
    span = xy.max(axis=0)
    n_tiles = max(1, math.ceil(n / cells_per_tile))
    area = max(float(span[0] * span[1]), 1e-12)
    side = math.sqrt(area / n_tiles) if span.min() > 0 else max(float(span.max()) / n_tiles, 1e-12)
    while _grid(span, side).prod() > n_tiles:  # a rectangle needs slightly larger squares to fit n_tiles
        side *= 1.02
    n_cols, n_rows = _grid(span, side)
    cols = np.minimum((xy[:, 0] / side).astype(np.int64), n_cols - 1)
    rows = np.minimum((xy[:, 1] / side).astype(np.int64), n_rows - 1)
    key = rows * (int(cols.max()) + 1) + cols
    order = np.argsort(key, kind="stable")
    bounds = np.flatnonzero(np.diff(key[order])) + 1
    tiles: list[np.ndarray] = []
    for group in np.split(order, bounds):
        tiles.extend(_split(xy, np.sort(group), limit, depth=0))
    return tiles


def _grid(span: np.ndarray, side: float) -> np.ndarray:
    """(columns, rows) of a grid of squares of ``side`` covering ``span``."""
    return np.maximum(np.ceil(span / side - 1e-9), 1).astype(np.int64)


def _split(xy: np.ndarray, idx: np.ndarray, limit: int, *, depth: int) -> list[np.ndarray]:
    """Split ``idx`` into quadrants around the centre of its box until every part has ``<= limit`` cells."""
    if len(idx) <= limit:
        return [idx] if len(idx) else []
    pts = xy[idx]
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    if depth >= 32 or np.all(hi - lo <= 1e-9):  # a pile of cells at one position: chunk by index
        return [idx[s:s + limit] for s in range(0, len(idx), limit)]
    mid = (lo + hi) / 2
    right, top = pts[:, 0] > mid[0], pts[:, 1] > mid[1]
    out: list[np.ndarray] = []
    for sel in (~right & ~top, right & ~top, ~right & top, right & top):
        out.extend(_split(xy, idx[sel], limit, depth=depth + 1))
    return out
