"""The coordinate convention stofm models are trained in, shared by ``stofm.embed``, stofm pretraining and
stalign's SE(2) niche encoder: a slide is scaled so that its diameter (largest distance between two spots/cells,
rotation invariant) is ``DIAMETER`` = 100 model units. In µm: ``units_per_um = 100 / slide diameter in µm`` (a
6.5 mm Visium capture area: ~0.015 units/µm, 1.5 units per 100 µm spot pitch)."""
from __future__ import annotations

import numpy as np

DIAMETER = 100.0


def slide_diameter(coords: np.ndarray) -> float:
    """Largest pairwise distance between cells (computed on the convex hull; rotation invariant)."""
    arr = np.asarray(coords, np.float64).reshape(-1, 2)
    arr = arr[np.isfinite(arr).all(1)]
    pts = np.unique(arr, axis=0)
    if len(pts) < 2:
        return 0.0
    if len(pts) > 3:
        from scipy.spatial import ConvexHull, QhullError

        try:
            pts = pts[ConvexHull(pts).vertices]
        except QhullError:  # collinear points: the diameter joins two of the axis extremes
            pts = pts[[pts[:, 0].argmin(), pts[:, 0].argmax(), pts[:, 1].argmin(), pts[:, 1].argmax()]]
    best = 0.0
    for start in range(0, len(pts), 2048):  # bounded memory for large hulls
        chunk = pts[start:start + 2048]
        d = np.sqrt(((chunk[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
        best = max(best, float(d))
    return best


def units_per_um(coords_um: np.ndarray) -> float:
    """Model units per µm of a slide whose spot/cell centres are ``coords_um`` (1.0 for a slide of one point)."""
    span = slide_diameter(coords_um)
    return DIAMETER / span if span > 0 else 1.0


def bbox_units_per_um(coords_um: np.ndarray) -> float:
    """The original SToFM's convention: model units per µm with the slide's bounding-box diagonal = 100 units (the
    frame is centred on the box centre, :func:`bbox_center`); 1.0 for a slide of one point."""
    arr = np.asarray(coords_um, np.float64).reshape(-1, 2)
    arr = arr[np.isfinite(arr).all(1)]
    if len(arr) == 0:
        return 1.0
    diag = float(np.sqrt(((arr.max(0) - arr.min(0)) ** 2).sum()))
    return DIAMETER / diag if diag > 0 else 1.0


def bbox_center(coords_um: np.ndarray) -> np.ndarray:
    """Centre (2,) of the bounding box of a slide's coordinates (the origin of the original SToFM's frame)."""
    arr = np.asarray(coords_um, np.float64).reshape(-1, 2)
    arr = arr[np.isfinite(arr).all(1)]
    return (arr.max(0) + arr.min(0)) / 2 if len(arr) else np.zeros(2)
