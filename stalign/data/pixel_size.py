"""Pixel size (µm/px) of a slide from every source its reader offers: the Visium array grid, the slide metadata,
the spot diameter, the spot pitch, HEST's metadata; one is chosen, all are recorded and compared.

A source is a zero-argument callable returning ``(µm/px, description)`` or raising :class:`PixelSizeError` when it
does not apply. :func:`settle_pixel_size` evaluates them all, picks the user's value, the requested source or the
first available one of the reader's ``auto`` order, and warns (:class:`PixelSizeWarning`) naming the values when
two available sources disagree by more than ``DISAGREEMENT``. Rules and constants: ``docs/readers.md``.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from stalign.data.errors import PixelSizeError
from stalign.data.slide import PLAUSIBLE_UM_PER_PX, check_um_per_px

#: ``pixel_size_from`` values every reader accepts; ``read_hest`` also takes "hest-estimated"/"hest-embedded".
PIXEL_SIZE_CHOICES = ("auto", "grid", "metadata", "spot-diameter", "pitch")
#: Visium: spot centres 100 µm apart (array_col steps of 2 along a row; rows 100·√3/2 µm apart).
VISIUM_PITCH_UM = 100.0
#: Space Ranger's ``spot_diameter_fullres`` spans a theoretical 65 µm spot (the capture spot itself is 55 µm).
VISIUM_FULLRES_DIAMETER_UM = 65.0
#: In "auto", slide metadata and the spot diameter must agree within this ratio (else the user must choose).
AUTO_AGREEMENT = 1.3
#: Available sources further apart than this ratio are warned about, naming the values.
DISAGREEMENT = 1.05
#: A grid fit is refused when its two axes' scales differ by more than this ratio (not the assumed packing).
GRID_MAX_ANISOTROPY = 1.05

PixelSizeCandidate = Callable[[], tuple[float, str]]  # returns (µm/px, description) or raises PixelSizeError


class PixelSizeWarning(UserWarning):
    """Two available pixel-size sources of one slide disagree by more than ``DISAGREEMENT``."""


@dataclass(frozen=True)
class PixelSize:
    """The chosen pixel size, its description and every available source's value (name -> µm/px)."""

    um_per_px: float
    source: str
    sources: dict[str, float] = field(default_factory=dict)


def settle_pixel_size(*, what: str, um_per_px: float | None, pixel_size_from: str,
                      candidates: dict[str, PixelSizeCandidate], auto_order: list[str],
                      must_agree: tuple[str, str] | None = None) -> PixelSize:
    """The user's ``um_per_px``, else the ``pixel_size_from`` source, else the first available of ``auto_order``.

    Every candidate is evaluated (those that do not apply are left out of ``sources``). In ``"auto"`` mode, when
    the chosen source is one of ``must_agree`` and the other one differs by more than ``AUTO_AGREEMENT``x,
    :class:`PixelSizeError` asks the user to choose instead of picking one silently.
    """
    if pixel_size_from not in candidates and pixel_size_from != "auto":
        raise PixelSizeError(f"{what}: pixel_size_from={pixel_size_from!r} is not available here; "
                             f"choose from {['auto', *candidates]}")
    found: dict[str, tuple[float, str]] = {}
    reasons: dict[str, str] = {}
    for name, get in candidates.items():
        try:
            value, source = get()
            value = check_um_per_px(value, what=f"{what} ({source})")
            if not PLAUSIBLE_UM_PER_PX[0] <= value <= PLAUSIBLE_UM_PER_PX[1]:
                raise PixelSizeError(f"{source} gives {value:.4g} µm/px, outside the plausible "
                                     f"{PLAUSIBLE_UM_PER_PX[0]:g}-{PLAUSIBLE_UM_PER_PX[1]:g}")
            found[name] = (value, source)
        except PixelSizeError as exc:
            reasons[name] = str(exc)
    sources = {name: value for name, (value, _) in found.items()}
    if um_per_px is not None:
        chosen = "user flag"
        value, source = check_um_per_px(um_per_px, what=f"{what} (um_per_px flag)"), "user flag"
        sources[chosen] = value
    else:
        order = auto_order if pixel_size_from == "auto" else [pixel_size_from]
        chosen = next((name for name in order if name in found), None)
        if chosen is None:
            ways = ["an explicit um_per_px (--um-per-px)"] + [f"pixel_size_from={n!r}" for n in candidates
                                                                if n not in order]
            raise PixelSizeError(f"{what}: no pixel size (µm/px) - "
                                 + "; ".join(f"{n}: {reasons[n]}" for n in order)
                                 + ". Supply one of: " + ", ".join(ways))
        value, source = found[chosen]
        if pixel_size_from == "auto" and must_agree is not None and chosen in must_agree:
            _check_agreement(what, chosen, found, must_agree)
    _warn_disagreement(what, chosen, sources)
    return PixelSize(um_per_px=value, source=source, sources=sources)


def _check_agreement(what: str, name: str, found: dict[str, tuple[float, str]], pair: tuple[str, str]) -> None:
    other = pair[1] if name == pair[0] else pair[0]
    if other not in found:
        return
    (value, source), (other_value, other_source) = found[name], found[other]
    if max(value, other_value) / min(value, other_value) > AUTO_AGREEMENT:
        raise PixelSizeError(f"{what}: the pixel sizes disagree - {source}: {value:.4g} µm/px, {other_source}: "
                             f"{other_value:.4g} µm/px; choose one with pixel_size_from={name!r} or {other!r}, "
                             "or pass um_per_px")


def _warn_disagreement(what: str, chosen: str, sources: dict[str, float]) -> None:
    if len(sources) < 2 or max(sources.values()) / min(sources.values()) <= DISAGREEMENT:
        return
    used = sources[chosen]
    far = max((n for n in sources if n != chosen), key=lambda n: max(sources[n], used) / min(sources[n], used))
    others = ", ".join(f"{n} {v:.4g}" for n, v in sources.items() if n not in (chosen, far))
    spread = max(sources.values()) / min(sources.values())
    warnings.warn(f"{what}: pixel-size sources disagree by {100 * (spread - 1):.0f}%: {chosen} {used:.4g} µm/px "
                  f"(used) vs {far} {sources[far]:.4g} µm/px" + (f" (also {others})" if others else "")
                  + "; check the slide, or choose with --pixel-size-from / --um-per-px", PixelSizeWarning,
                  stacklevel=4)


def metadata_candidate(slide) -> PixelSizeCandidate:
    """The slide's own metadata (``Slide.um_per_px``)."""
    def get() -> tuple[float, str]:
        if slide.um_per_px is None:
            raise PixelSizeError(f"{slide.path} has no usable pixel size in its metadata"
                                 + (f" ({slide.pixel_size_note})" if slide.pixel_size_note else ""))
        return slide.um_per_px, slide.pixel_size_source
    return get


def spot_diameter_candidate(diameter_px: float | None, diameter_um: float | None, where: str, *,
                            label: str = "Visium spot diameter") -> PixelSizeCandidate:
    """``diameter_um`` / ``diameter_px`` (e.g. Space Ranger's ``spot_diameter_fullres``: 65 µm)."""
    def get() -> tuple[float, str]:
        if diameter_px is None or not np.isfinite(diameter_px) or diameter_px <= 0:
            raise PixelSizeError(f"no spot_diameter_fullres in {where}")
        if diameter_um is None:
            raise PixelSizeError(f"the spot diameter in µm is not known for {where}; pass spot_diameter_um "
                                 "(--spot-diameter-um)")
        return diameter_um / diameter_px, f"{label} ({diameter_um:g} µm = {diameter_px:.2f} px, {where})"
    return get


def knn_pitch_candidate(coords: np.ndarray, pitch_um: float | None) -> PixelSizeCandidate:
    """``pitch_um`` / the median first-ring neighbour spacing of the given spots (a subset reads wider)."""
    def get() -> tuple[float, str]:
        from scipy.spatial import cKDTree

        if pitch_um is None:
            raise PixelSizeError("the spot pitch in µm is not known; pass spot_pitch_um (--spot-pitch-um)")
        pts = coords[np.isfinite(coords).all(axis=1)]
        if len(pts) < 2:
            raise PixelSizeError("fewer than 2 spots to measure the spot pitch")
        dist, _ = cKDTree(pts).query(pts, k=min(7, len(pts)))
        nearest = float(np.median(dist[:, 1]))
        if nearest <= 0:
            raise PixelSizeError("spots coincide; cannot measure the spot pitch")
        shell = dist[:, 1:][dist[:, 1:] <= 1.2 * nearest]  # all first-ring neighbours, not only the closest
        spacing = float(np.median(shell))
        return pitch_um / spacing, (f"spot pitch ({pitch_um:g} µm = median first-ring spacing {spacing:.2f} px of "
                                    f"the {len(pts)} spots given; a subset of the spots reads wider)")
    return get


def grid_candidate(rows: np.ndarray | None, cols: np.ndarray | None, coords: np.ndarray, *, pitch_um: float | None,
                   packing: str = "hex", where: str) -> PixelSizeCandidate:
    """Least-squares affine fit of pixel (x, y) on (``rows``, ``cols``) array indices; see :func:`fit_array_grid`."""
    def get() -> tuple[float, str]:
        if rows is None or cols is None:
            raise PixelSizeError(f"no array_row/array_col in {where}")
        if pitch_um is None:
            raise PixelSizeError("the spot pitch in µm is not known; pass spot_pitch_um (--spot-pitch-um)")
        return fit_array_grid(rows, cols, coords, pitch_um=pitch_um, packing=packing, where=where)
    return get


def fit_array_grid(rows: np.ndarray, cols: np.ndarray, coords: np.ndarray, *, pitch_um: float = VISIUM_PITCH_UM,
                   packing: str = "hex", where: str = "the positions") -> tuple[float, str]:
    """µm/px from spot positions on an array grid, robust to rotation, flips and any subset of the positions.

    ``packing="hex"`` (Visium): ``array_col`` steps of 2 are ``pitch_um`` apart along a row, rows are
    ``pitch_um·√3/2`` apart; ``"square"`` (legacy ST): one index step is ``pitch_um``. The fit (x, y) ~ A·(row,
    col) + t gives both axes' px per µm; their root mean square is the scale. Refused (:class:`PixelSizeError`)
    when fewer than 3 positions span the plane, the axes' scales differ by more than ``GRID_MAX_ANISOTROPY``x (not
    this packing) or the positions lie off the fitted grid (rms residual above a fifth of the pitch).
    """
    if packing not in ("hex", "square"):
        raise ValueError(f"packing must be 'hex' or 'square', got {packing!r}")
    idx = np.column_stack([np.asarray(rows, dtype=np.float64), np.asarray(cols, dtype=np.float64)])
    xy = np.asarray(coords, dtype=np.float64)
    ok = np.isfinite(idx).all(axis=1) & np.isfinite(xy).all(axis=1)
    design = np.column_stack([idx[ok], np.ones(int(ok.sum()))])
    if len(design) < 3 or np.linalg.matrix_rank(design) < 3:
        raise PixelSizeError(f"{where}: fewer than 3 spot positions off one line of the array grid")
    step_um = np.array((pitch_um * math.sqrt(3) / 2, pitch_um / 2) if packing == "hex" else (pitch_um, pitch_um))
    xy, inlier = xy[ok], np.ones(len(design), dtype=bool)
    for _ in range(3):  # refit without positions far off the grid (at most a tenth of them)
        fit, *_ = np.linalg.lstsq(design[inlier], xy[inlier], rcond=None)
        px_per_um = np.linalg.svd(fit[:2] / step_um[:, None], compute_uv=False)
        pitch_px = pitch_um * float(np.sqrt(np.mean(px_per_um ** 2)))
        off = np.linalg.norm(design @ fit - xy, axis=1)
        keep = off <= 0.2 * pitch_px
        if keep.sum() < 0.9 * len(design) or (keep == inlier).all() or np.linalg.matrix_rank(design[keep]) < 3:
            break
        inlier = keep
    if px_per_um[1] <= 0 or px_per_um[0] / px_per_um[1] > GRID_MAX_ANISOTROPY:
        raise PixelSizeError(f"{where}: the array grid is not {packing}-packed with a {pitch_um:g} µm pitch (its "
                             f"axes scale {px_per_um[0]:.4g} and {px_per_um[1]:.4g} px/µm)")
    rms = float(np.sqrt(np.mean(off[inlier] ** 2)))
    if rms > 0.2 * pitch_px:
        raise PixelSizeError(f"{where}: the spots lie off the array grid (rms residual {rms:.1f} px for a "
                             f"{pitch_px:.1f} px pitch)")
    dropped = f", {int((~inlier).sum())} off the grid left out" if not inlier.all() else ""
    return pitch_um / pitch_px, (f"array grid ({pitch_um:g} µm {packing} pitch = {pitch_px:.2f} px, fit on "
                                 f"{int(inlier.sum())} positions of {where}{dropped})")


__all__ = ["AUTO_AGREEMENT", "DISAGREEMENT", "PIXEL_SIZE_CHOICES", "PLAUSIBLE_UM_PER_PX", "PixelSize",
           "PixelSizeCandidate", "PixelSizeWarning", "VISIUM_FULLRES_DIAMETER_UM", "VISIUM_PITCH_UM",
           "fit_array_grid", "grid_candidate", "knn_pitch_candidate", "metadata_candidate",
           "settle_pixel_size", "spot_diameter_candidate"]
