"""Tissue detection on a slide thumbnail.

Two kinds of evidence, either of which marks a pixel as tissue: stained tissue (Otsu's threshold on the HSV
saturation, with a floor) and faint tissue (pale stroma, fat, thin sections): pixels darker (optical density) or
more coloured than the glass, whose colour and noise are measured on the thumbnail's border. Then morphological
clean-up: closing, hole filling, removal of small objects (as CLAM / HEST's classical segmentation do).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stofm.util.errors import InputError

if TYPE_CHECKING:
    from stalign.data.slide import Slide

#: Below this contrast (saturation/darkness units, 0..1) a thumbnail is treated as having no tissue at all.
MIN_TISSUE_SIGNAL = 0.08
#: Faint tissue: at least this optical density (log10) above the glass (0.02 = 4.5 % darker) ...
MIN_FAINT_OD = 0.02
#: ... or this much more saturated than the glass (CLAM's default saturation threshold is 8/255 = 0.031) ...
MIN_FAINT_SATURATION = 0.03
#: ... and in either case this many standard deviations of the glass's own noise above it.
FAINT_NOISE_SIGMAS = 5.0
#: The glass is read from the outer ring of the thumbnail, this fraction of its shorter side wide.
BORDER_FRACTION = 0.05
#: An object of the mask with fewer stained pixels than this share and grey on average is not tissue.
MIN_STAINED_SHARE = 0.005
#: Border pixels more saturated than this are not glass (a tissue-coloured border: no glass model).
MAX_GLASS_SATURATION = 0.1


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


@dataclass(frozen=True)
class Glass:
    """The background measured on a thumbnail's border: its colour and the noise of the two faint-tissue signals
    (optical density above the glass, saturation), each after the 5x5 mean filter the mask applies."""

    rgb: tuple[int, int, int]
    od_sigma: float
    saturation: float
    saturation_sigma: float

    @property
    def od_threshold(self) -> float:
        return max(MIN_FAINT_OD, FAINT_NOISE_SIGMAS * self.od_sigma)

    @property
    def saturation_threshold(self) -> float:
        return self.saturation + max(MIN_FAINT_SATURATION, FAINT_NOISE_SIGMAS * self.saturation_sigma)


@dataclass(frozen=True)
class MaskInfo:
    """How a mask was made: the stained-tissue saturation threshold and the glass model (None: none found)."""

    saturation_threshold: float
    glass: Glass | None

    def describe(self) -> str:
        text = f"stained: saturation > {self.saturation_threshold:.3f} (Otsu, floor {MIN_TISSUE_SIGNAL:g})"
        if self.glass is None:
            return text + "; faint: off (no glass model of the thumbnail border)"
        g = self.glass
        return (text + f"; faint: optical density > {g.od_threshold:.3f} above the glass RGB{g.rgb} or saturation "
                f"> {g.saturation_threshold:.3f} (glass from the thumbnail border)")

    def to_dict(self) -> dict[str, Any]:
        g = self.glass
        return {"saturation_threshold": round(self.saturation_threshold, 4),
                "glass_rgb": None if g is None else list(g.rgb),
                "faint_od_threshold": None if g is None else round(g.od_threshold, 4),
                "faint_saturation_threshold": None if g is None else round(g.saturation_threshold, 4)}


def _od(rgb: np.ndarray, glass_rgb: np.ndarray) -> np.ndarray:
    """Mean optical density (log10) of ``rgb`` (0..1) relative to ``glass_rgb``, per pixel."""
    floor = 1.0 / 255
    return np.log10(np.maximum(glass_rgb, floor) / np.maximum(rgb, floor)).mean(axis=-1)


def _smooth(values: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.uniform_filter(values, size=5, mode="nearest")


def _glass_and_signals(thumb_rgb: np.ndarray, saturation: np.ndarray, *, border: float = BORDER_FRACTION
                       ) -> tuple[Glass | None, np.ndarray | None, np.ndarray | None]:
    """The glass colour and noise from the thumbnail's border ring (of the ring's pixels, the brighter and less
    saturated half: tissue touching part of the border is left out) and the two smoothed faint-tissue signals of
    every pixel (optical density above the glass, saturation); Nones when that half is itself coloured (tissue all
    around) or the ring is too thin to measure."""
    rgb = np.asarray(thumb_rgb, dtype=np.float32)[..., :3] / 255.0
    h, w = rgb.shape[:2]
    r = max(1, round(border * min(h, w)))
    if min(h, w) < 2 * r + 4:
        return None, None, None
    ring = np.ones((h, w), dtype=bool)
    ring[r:-r, r:-r] = False
    score = rgb.mean(axis=-1) - saturation  # glass: bright and grey
    ring_score = score[ring]
    glass_px = ring & (score >= np.median(ring_score))
    colour = np.median(rgb[glass_px], axis=0)
    sat = float(np.median(saturation[glass_px]))
    if sat > MAX_GLASS_SATURATION:
        return None, None, None
    od_all, s_all = _smooth(_od(rgb, colour)), _smooth(saturation)
    od, s = od_all[glass_px], s_all[glass_px]
    mad = 1.4826  # MAD -> standard deviation of a normal distribution
    glass = Glass(rgb=tuple(int(round(c * 255)) for c in colour), saturation=sat,
                  od_sigma=float(mad * np.median(np.abs(od - np.median(od)))),
                  saturation_sigma=float(mad * np.median(np.abs(s - np.median(s)))))
    return glass, od_all, s_all


def fill_small_holes(mask: np.ndarray, *, max_fraction: float) -> np.ndarray:
    """``mask`` with its holes (background not connected to the image edge) of at most ``max_fraction`` of the
    image filled."""
    from scipy import ndimage

    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if not n:
        return mask
    small = np.bincount(holes.ravel()) <= max_fraction * mask.size
    small[0] = False
    return mask | small[holes]


def tissue_mask(thumb_rgb: np.ndarray, **options: Any) -> np.ndarray:
    """Boolean tissue mask of a thumbnail (True = tissue); ``options`` and method: :func:`tissue_mask_info`."""
    return tissue_mask_info(thumb_rgb, **options)[0]


def tissue_mask_info(thumb_rgb: np.ndarray, *, channel: str = "saturation", min_signal: float = MIN_TISSUE_SIGNAL,
                     min_object_fraction: float = 0.001, max_hole_fraction: float = 0.02,
                     faint: bool = True) -> tuple[np.ndarray, MaskInfo]:
    """Boolean tissue mask of a thumbnail (True = tissue) and how it was made.

    Stained tissue: Otsu's threshold on :func:`tissue_signal`, never below ``min_signal`` (a blank slide has no
    tissue); when the class below Otsu's threshold is itself above ``min_signal`` there is no background and Otsu
    is only splitting pale from dark tissue, so ``min_signal`` is used instead. Faint tissue (``faint``): after a
    5x5 mean filter, optical density or saturation above the glass (:func:`_glass_and_signals`) by more than
    ``MIN_FAINT_OD`` / ``MIN_FAINT_SATURATION`` and ``FAINT_NOISE_SIGMAS`` times the glass's noise. Then a 3x3
    opening of the stained pixels (specks), a closing (nuclei of pale tissue join up), filling of holes up to
    ``max_hole_fraction`` of the thumbnail (larger ones are glass, e.g. inside a Visium fiducial frame), and removal
    of objects smaller than ``min_object_fraction`` of the thumbnail and of grey objects (less than
    ``MIN_STAINED_SHARE`` stained pixels and no more colour on average than faint tissue needs: a Visium fiducial
    frame, pen, dust).
    """
    from scipy import ndimage

    saturation = tissue_signal(thumb_rgb)
    signal = saturation if channel == "saturation" else tissue_signal(thumb_rgb, channel=channel)
    threshold = max(otsu_threshold(signal), min_signal)
    below = signal[signal <= threshold]
    if below.size == 0 or float(below.mean()) > min_signal:
        threshold = min_signal
    pad = 4  # replicate the border so the morphology does not eat tissue touching the image edge
    structure = np.ones((3, 3), dtype=bool)
    mask = ndimage.binary_opening(np.pad(signal > threshold, pad, mode="edge"), structure=structure)
    glass, od, saturation = _glass_and_signals(thumb_rgb, saturation) if faint else (None, None, None)
    if glass is not None:
        faint_px = (od > glass.od_threshold) | (saturation > glass.saturation_threshold)
        mask |= np.pad(faint_px, pad, mode="edge")
    mask = ndimage.binary_closing(mask, structure=structure, iterations=2)[pad:-pad, pad:-pad]
    mask = fill_small_holes(mask, max_fraction=max_hole_fraction)
    labels, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= max(1, min_object_fraction * mask.size)
        if glass is not None and channel == "saturation":  # grey objects only darker than the glass: Visium
            index = labels.ravel()                         # fiducial frames, pen, dust, shadows
            stained = np.bincount(index, weights=(signal > threshold).ravel(), minlength=n + 1)
            colour = np.bincount(index, weights=saturation.ravel(), minlength=n + 1) / np.maximum(sizes, 1)
            keep &= (stained >= MIN_STAINED_SHARE * sizes) | (colour > glass.saturation_threshold)
        keep[0] = False
        mask = keep[labels]
    return mask, MaskInfo(saturation_threshold=float(threshold), glass=glass)


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
