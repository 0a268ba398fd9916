"""Continuous heat-map images (``--mode grid``): predicted values spread over the thumbnail's pixels, clipped to
the tissue.

Tiles of ``stalign predict`` (a square lattice) are interpolated bilinearly between tile centres (a tile centre
keeps its own value exactly; no triangulation, so no slanted seams); other spots (a Visium hexagonal array, given
coordinates) linearly over their triangulation. A pixel is drawn only where it is tissue (when a thumbnail is
given) and near a predicted point: inside a tile's square, or on tissue within half a step beyond the outer tiles
(tissue strips too thin for a tile of their own); inside the spots' triangles (a lone spot: 0.6 pitch around it). Nothing is drawn on the glass.
The pixel weights are computed once per map layout (:class:`GridLayout`) and reused for every gene.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Coordinates within this fraction of the step from a square lattice's nodes count as lying on the lattice.
LATTICE_TOLERANCE = 0.02
#: Scattered spots: a spot in no triangle is drawn this many pitches around it ...
SPOT_REACH = 0.6
#: ... and triangles with a side longer than this many pitches are not drawn (a gap in the array).
MAX_SIDE = 2.0


def spot_pitch(coords: np.ndarray) -> float:
    """Median distance from a point to its nearest neighbour (0 for fewer than two points)."""
    from scipy.spatial import cKDTree

    if len(coords) < 2:
        return 0.0
    return float(np.median(cKDTree(coords).query(coords, k=2)[0][:, 1]))


def lattice_step(coords: np.ndarray) -> float | None:
    """The step of the square, axis-aligned lattice every point lies on (predict's tiles), else None."""
    step = spot_pitch(coords)
    if step <= 0:
        return None
    rel = (coords - coords.min(0)) / step
    return step if float(np.abs(rel - np.round(rel)).max()) <= LATTICE_TOLERANCE else None


def _pixel_centres(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    return np.arange(w) + 0.5, np.arange(h) + 0.5


@dataclass
class GridLayout:
    """Per thumbnail pixel, the points it is interpolated from (``index`` (K, h, w), -1 for none) with their
    ``weight`` (K, h, w), and the pixels drawn (``visible`` (h, w))."""

    index: np.ndarray
    weight: np.ndarray
    visible: np.ndarray

    def image(self, values: np.ndarray) -> np.ma.MaskedArray:
        """``values`` (N,) of the points as a masked (h, w) image."""
        values = np.asarray(values, np.float64)
        total = (np.where(self.index >= 0, values[np.maximum(self.index, 0)], 0.0) * self.weight).sum(0)
        norm = self.weight.sum(0)
        out = np.divide(total, norm, out=np.zeros_like(total), where=norm > 0)
        return np.ma.masked_array(out, ~self.visible | (norm <= 0))


def _lattice_layout(coords: np.ndarray, shape: tuple[int, int], step: float) -> tuple[GridLayout, np.ndarray]:
    """Bilinear weights between lattice nodes (the tiles among a pixel's 4 surrounding nodes, renormalised); the
    pixels with any tile among those nodes are visible; also the mask of the pixels inside a tile's own square."""
    origin = coords.min(0)
    idx = np.round((coords - origin) / step).astype(np.int64) + 1  # one empty node of padding on each side
    nodes = np.full((idx[:, 1].max() + 2, idx[:, 0].max() + 2), -1, np.int64)
    nodes[idx[:, 1], idx[:, 0]] = np.arange(len(coords))
    px, py = _pixel_centres(shape)
    gx, gy = (px - origin[0]) / step + 1, (py - origin[1]) / step + 1
    x0, y0 = np.floor(gx).astype(np.int64), np.floor(gy).astype(np.int64)
    fx, fy = gx - x0, gy - y0

    def node(ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        ok = ((ys >= 0) & (ys < nodes.shape[0]))[:, None] & ((xs >= 0) & (xs < nodes.shape[1]))[None, :]
        found = nodes[np.clip(ys, 0, nodes.shape[0] - 1)][:, np.clip(xs, 0, nodes.shape[1] - 1)]
        return np.where(ok, found, -1)

    index = np.stack([node(y0 + dy, x0 + dx) for dy in (0, 1) for dx in (0, 1)])
    bilinear = np.stack([wy[:, None] * wx[None, :] for wy in (1 - fy, fy) for wx in (1 - fx, fx)])
    weight = np.where(index >= 0, bilinear + 1e-9, 0.0)  # + 1e-9: a pixel on a cell border still has its tile
    in_tile = node(np.round(gy).astype(np.int64), np.round(gx).astype(np.int64)) >= 0
    return GridLayout(index, weight, (index >= 0).any(0)), in_tile


def _scattered_layout(coords: np.ndarray, shape: tuple[int, int], reach: float) -> GridLayout:
    """Barycentric weights over the spots' triangulation, drawn inside its triangles whose sides are at most
    ``MAX_SIDE`` pitches (no bridge over a gap, no flat disc of a border spot's value beyond the array); a spot in
    no such triangle is drawn as itself, within ``reach``."""
    from scipy.spatial import Delaunay, QhullError, cKDTree

    px, py = _pixel_centres(shape)
    pts = np.column_stack([np.tile(px, len(py)), np.repeat(py, len(px))])
    dist, nearest = cKDTree(coords).query(pts)
    index = np.full((3, len(pts)), -1, np.int64)
    weight = np.zeros((3, len(pts)))
    index[0], weight[0] = nearest, 1.0
    alone = np.ones(len(coords), bool)
    drawn = np.zeros(len(pts), bool)
    try:
        tri = Delaunay(coords) if len(coords) >= 3 else None
    except QhullError:  # collinear spots: each drawn as itself
        tri = None
    if tri is not None:
        corners = coords[tri.simplices]
        sides = np.linalg.norm(corners - np.roll(corners, 1, axis=1), axis=-1).max(1)
        good = sides <= MAX_SIDE * spot_pitch(coords)
        alone[np.unique(tri.simplices[good])] = False
        simplex = tri.find_simplex(pts)
        inside = simplex >= 0
        inside[inside] = good[simplex[inside]]
        t = tri.transform[simplex[inside]]
        bary = np.einsum("nij,nj->ni", t[:, :2], pts[inside] - t[:, 2])
        index[:, inside] = tri.simplices[simplex[inside]].T
        weight[:, inside] = np.column_stack([bary, 1 - bary.sum(1)]).T.clip(0, 1)
        drawn = inside
    drawn |= alone[nearest] & (dist <= reach)
    h, w = shape
    return GridLayout(index.reshape(3, h, w), weight.reshape(3, h, w), drawn.reshape(h, w))


def grid_layout(coords_thumb: np.ndarray, shape: tuple[int, int], *, spot_diameter: float,
                tissue: np.ndarray | None = None) -> GridLayout:
    """The :class:`GridLayout` of points at ``coords_thumb`` (thumbnail px) on an (h, w) thumbnail, clipped to
    the tissue mask ``tissue`` when given (without one, tiles are drawn as their squares)."""
    coords = np.asarray(coords_thumb, np.float64).reshape(-1, 2)
    clip = tissue is not None and tissue.shape == tuple(shape) and bool(tissue.any())
    step = lattice_step(coords)
    if step is not None:
        layout, in_tile = _lattice_layout(coords, shape, step)
        if not clip:  # no tissue outline to follow: the tiles' squares
            layout.visible &= in_tile
    else:
        layout = _scattered_layout(coords, shape, max(spot_diameter / 2, SPOT_REACH * spot_pitch(coords), 0.5))
    if clip:
        layout.visible &= tissue
    return layout


def thumbnail_tissue(thumbnail: np.ndarray | None) -> np.ndarray | None:
    """The tissue mask of the thumbnail (``stalign.data.tissue``), None without a thumbnail or tissue."""
    if thumbnail is None:
        return None
    from stalign.data.tissue import tissue_mask

    try:
        mask = tissue_mask(thumbnail)
    except ValueError:  # a thumbnail without contrast: no mask to clip to
        return None
    return mask if mask.any() else None
