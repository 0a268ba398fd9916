"""Macenko stain normalisation (Macenko et al., ISBI 2009), batched over crops in numpy.

The algorithm and its constants are torchstain's ``MacenkoNormalizer`` (numpy backend, itself from
schaugf/HEnorm_python): optical density ``-log((rgb + 1) / 240)``; tissue pixels are those with OD >= 0.15 in every
channel; the plane of the two largest eigenvectors of their OD covariance; the 1st and 99th percentile angles in
that plane give the two stain vectors (haematoxylin first: the larger red OD); concentrations by least squares over
all pixels, scaled by their 99th percentiles to the target's; the image rebuilt with the target stain matrix.
``tests/test_stain_norm.py`` checks the output against torchstain's, crop by crop.

Each crop is fitted on its own (as torchstain normalises one image), so a crop's result does not depend on the
batch it is read in. A crop with too few tissue pixels to fit (:data:`MIN_TISSUE_FRACTION`), or whose fit is
degenerate, is left unchanged.
"""
from __future__ import annotations

import numpy as np

from stalign.data.errors import DataPrepError

STAIN_METHODS = ("none", "macenko")
IO, ALPHA, BETA = 240.0, 1.0, 0.15  # transmitted light, percentile of the extreme angles, OD threshold of tissue
MAX_PERCENTILE = 99.0  # concentration percentile scaled to the target's
MIN_TISSUE_FRACTION = 0.05  # a crop with fewer tissue pixels is left unchanged
CHUNK = 16  # crops normalised at once (bounds the float64 working memory to ~20 MB at 224 px)


class StainError(DataPrepError):
    """Stain normalisation cannot be fitted (no tissue pixels) or has an invalid target."""


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """``-log((rgb + 1) / IO)`` in float64, same shape."""
    return -np.log((np.asarray(rgb, np.float64) + 1.0) / IO)


def _masked_percentile(values: np.ndarray, valid: np.ndarray, q: float) -> np.ndarray:
    """``np.percentile(row[valid_row], q)`` (linear interpolation) of each row of ``values`` (N, M); rows with no
    valid entry give NaN."""
    v = np.sort(np.where(valid, values, np.inf), axis=1)
    n = valid.sum(1)
    pos = q / 100.0 * np.maximum(n - 1, 0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
    rows = np.arange(len(v))
    a, b = v[rows, lo], v[rows, hi]
    with np.errstate(invalid="ignore"):  # rows without a valid entry (inf - inf) give NaN below
        out = a + (pos - lo) * np.where(hi > lo, b - a, 0.0)
    return np.where(n > 0, out, np.nan)


def estimate(od: np.ndarray, *, min_fraction: float = MIN_TISSUE_FRACTION
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Macenko's estimate for each of N images of OD pixels ``od`` (N, M, 3): (stain matrices (N, 3, 2) with
    haematoxylin first, concentrations (N, M, 2), their 99th percentiles (N, 2), usable (N,) bool: enough tissue
    pixels and a well-posed fit)."""
    m = od.shape[1]
    valid = ~np.any(od < BETA, axis=2)
    count = valid.sum(1)
    ok = count >= max(3, min_fraction * m)
    w = valid[..., None].astype(np.float64)
    mean = (od * w).sum(1) / np.maximum(count, 1)[:, None]
    centred = (od - mean[:, None]) * w
    cov = np.einsum("nmi,nmj->nij", centred, centred) / np.maximum(count - 1, 1)[:, None, None]
    cov[~ok] = np.eye(3)
    plane = np.linalg.eigh(cov)[1][:, :, 1:3]  # (N, 3, 2): the two largest eigenvectors, ascending
    proj = np.einsum("nmi,nik->nmk", od, plane)
    phi = np.arctan2(proj[..., 1], proj[..., 0])
    lo, hi = _masked_percentile(phi, valid, ALPHA), _masked_percentile(phi, valid, 100.0 - ALPHA)
    v_min = np.einsum("nik,nk->ni", plane, np.stack([np.cos(lo), np.sin(lo)], 1))
    v_max = np.einsum("nik,nk->ni", plane, np.stack([np.cos(hi), np.sin(hi)], 1))
    h_first = (v_min[:, 0] > v_max[:, 0])[:, None]
    he = np.stack([np.where(h_first, v_min, v_max), np.where(h_first, v_max, v_min)], axis=2)
    he = np.nan_to_num(he)
    sv = np.linalg.svd(he, compute_uv=False)
    ok &= sv[:, 1] > 1e-6 * np.maximum(sv[:, 0], 1e-12)
    he[~ok] = np.eye(3)[:, :2]
    conc = np.einsum("nki,nmi->nmk", np.linalg.pinv(he), od)
    max_c = np.percentile(conc, MAX_PERCENTILE, axis=1)
    ok &= np.all(np.isfinite(max_c) & (max_c > 1e-6), axis=1)
    return he, conc, max_c, ok


def fit_target(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The target of a normalisation from RGB ``pixels`` (any shape ending in 3, uint8; e.g. crops of the training
    slides pooled as one image): (stain matrix (3, 2), max concentrations (2,)). :class:`StainError` when they
    hold too few tissue pixels."""
    od = optical_density(np.asarray(pixels).reshape(1, -1, 3))
    he, _, max_c, ok = estimate(od)
    if not ok[0]:
        raise StainError(f"cannot fit a stain target: {int((~np.any(od < BETA, axis=2)).sum())} of {od.shape[1]} "
                         f"pixels are stained (optical density >= {BETA} in every channel)")
    return he[0], max_c[0]


def check_target(matrix: object, max_conc: object) -> tuple[np.ndarray, np.ndarray]:
    """A stain target as float64 arrays ((3, 2), (2,)); :class:`StainError` naming the value when it is not a
    finite, positive stain matrix with positive concentrations."""
    try:
        he, mc = np.asarray(matrix, np.float64), np.asarray(max_conc, np.float64)
    except (TypeError, ValueError):
        raise StainError(f"stain target must be numbers, got matrix {matrix!r}, max {max_conc!r}") from None
    if he.shape != (3, 2) or mc.shape != (2,) or not (np.isfinite(he).all() and np.isfinite(mc).all()) \
            or (mc <= 0).any() or (np.linalg.norm(he, axis=0) <= 0).any():
        raise StainError(f"stain target must be a finite 3x2 stain matrix and 2 positive maxima, got matrix "
                         f"{np.asarray(matrix).tolist()!r}, max {np.asarray(max_conc).tolist()!r}")
    return he, mc


def normalize(crops: np.ndarray, matrix: np.ndarray, max_conc: np.ndarray, *, out: np.ndarray | None = None
              ) -> np.ndarray:
    """``crops`` (N, H, W, 3) uint8 normalised to the target (``matrix`` (3, 2), ``max_conc`` (2,)), each crop
    fitted on its own; written into ``out`` (may be ``crops``) when given. Crops that cannot be fitted are
    copied unchanged."""
    crops = np.asarray(crops)
    out = np.empty_like(crops) if out is None else out
    target, target_max = check_target(matrix, max_conc)
    for s in range(0, len(crops), CHUNK):
        block = crops[s:s + CHUNK]
        n = len(block)
        od = optical_density(block.reshape(n, -1, 3))
        _, conc, max_c, ok = estimate(od)
        scaled = conc / (max_c / target_max)[:, None, :]
        rgb = np.minimum(IO * np.exp(-np.einsum("ik,nmk->nmi", target, scaled)), 255.0)
        new = rgb.reshape(block.shape).astype(np.uint8)
        out[s:s + n] = np.where(ok[:, None, None, None], new, block)
    return out
