"""Tissue detection on a slide thumbnail: Otsu on a saturation/darkness channel, then morphological clean-up."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stofm.util.errors import InputError

if TYPE_CHECKING:
    from stalign.data.slide import Slide

#: Below this contrast (saturation/darkness units, 0..1) a thumbnail is treated as having no tissue at all.
MIN_TISSUE_SIGNAL = 0.08


def tissue_signal(thumb_rgb: np.ndarray, *, channel: str = "saturation") -> np.ndarray:
    """Per-pixel tissue evidence in [0, 1].

    ``"saturation"`` (HSV saturation: stained tissue is coloured, glass and grey background are not),
    ``"darkness"`` (1 - grey level: for unstained/grey tissue on a white background) or ``"max"`` of both.
    """
    rgb = np.asarray(thumb_rgb, dtype=np.float32)[..., :3] / 255.0
    hi, lo = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = (hi - lo) / np.maximum(hi, 1e-6)
    darkness = 1.0 - rgb.mean(axis=-1)
    channels = {"saturation": saturation, "darkness": darkness, "max": np.maximum(saturation, darkness)}
    if channel not in channels:
        raise InputError(f"tissue channel must be one of {sorted(channels)}, got {channel!r}")
    return channels[channel]


def otsu_threshold(values: np.ndarray, *, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (maximises the between-class variance of the histogram)."""
    hist, edges = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centers)
    mu0 = m0 / np.maximum(w0, 1e-12)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1e-12)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(edges[int(np.argmax(between[:-1])) + 1])


def tissue_mask(thumb_rgb: np.ndarray, *, channel: str = "saturation", min_signal: float = MIN_TISSUE_SIGNAL,
                min_object_fraction: float = 0.001) -> np.ndarray:
    """Boolean tissue mask of a thumbnail (True = tissue).

    Otsu's threshold on :func:`tissue_signal`, never below ``min_signal`` (a blank slide has no tissue); when
    the class below Otsu's threshold is itself above ``min_signal`` there is no background and Otsu is only
    splitting pale from dark tissue, so ``min_signal`` is used instead. Then a binary opening and
    closing with a 3x3 element, hole filling, and removal of objects smaller than ``min_object_fraction`` of
    the thumbnail.
    """
    from scipy import ndimage

    signal = tissue_signal(thumb_rgb, channel=channel)
    threshold = max(otsu_threshold(signal), min_signal)
    below = signal[signal <= threshold]
    if below.size == 0 or float(below.mean()) > min_signal:
        threshold = min_signal
    pad = 4  # replicate the border so the morphology does not eat tissue touching the image edge
    mask = np.pad(signal > threshold, pad, mode="edge")
    structure = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_opening(mask, structure=structure)
    mask = ndimage.binary_closing(mask, structure=structure, iterations=2)
    mask = ndimage.binary_fill_holes(mask)[pad:-pad, pad:-pad]
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, min_object_fraction * mask.size)
        keep[0] = False
        mask = keep[labels]
    return mask


def tissue_fraction(mask: np.ndarray, coords_thumb: np.ndarray, *, radius: float = 1.0) -> np.ndarray:
    """Fraction of mask pixels within a (2r+1)-pixel square around each (x, y) thumbnail position."""
    coords = np.asarray(coords_thumb, dtype=np.float64).reshape(-1, 2)
    r = max(round(radius), 0)
    integral = np.pad(mask.astype(np.int64), ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    h, w = mask.shape
    cx = np.floor(coords[:, 0]).astype(np.int64)
    cy = np.floor(coords[:, 1]).astype(np.int64)
    x0, x1 = np.clip(cx - r, 0, w), np.clip(cx + r + 1, 0, w)
    y0, y1 = np.clip(cy - r, 0, h), np.clip(cy + r + 1, 0, h)
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / float((2 * r + 1) ** 2)


def spots_on_tissue(slide: Slide, coords_px: Any, *, thumb_size: int = 1024, min_fraction: float = 0.5,
                    window_px: float | None = None, mask: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool: spots whose neighbourhood on the thumbnail is at least ``min_fraction`` tissue.

    The neighbourhood is a square ``window_px`` level-0 pixels wide (e.g. the spot diameter), at least 3x3
    thumbnail pixels. Pass ``mask`` (from :func:`tissue_mask` of ``slide.thumbnail(thumb_size)``) to reuse one.
    """
    thumb, ds = slide.thumbnail(thumb_size)
    if mask is None:
        mask = tissue_mask(thumb)
    elif mask.shape != thumb.shape[:2]:
        raise ValueError(f"{slide.path}: tissue mask shape {mask.shape} != thumbnail shape {thumb.shape[:2]}")
    radius = 1.0 if window_px is None else max(1.0, float(window_px) / ds / 2)
    coords = np.asarray(coords_px, dtype=np.float64).reshape(-1, 2) / ds
    return tissue_fraction(mask, coords, radius=radius) >= min_fraction
