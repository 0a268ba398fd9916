"""Open whole-slide and plain images and read crops of any physical size from the best pyramid level.

``open_slide`` reads every format openslide knows (svs, tiff, ndpi, mrxs, scn, bif, DICOM, ...) through
openslide, and plain JPEG/PNG/BMP or TIFFs that openslide refuses (stripped, non-pyramidal) through PIL or
tifffile as in-memory levels. A :class:`Slide` pickles as its path, so worker processes reopen it cheaply.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Self

import numpy as np

from stalign.data.errors import CoordinateError, PixelSizeError, SlideError
from stalign.data.slide_backends import ArrayBackend, OpenSlideBackend, open_backend
from stofm.util.errors import InputError

#: Pixel sizes outside this range (µm/px) are placeholders (72 dpi TIFF defaults etc.), not calibration.
PLAUSIBLE_UM_PER_PX = (0.01, 50.0)
#: Names of the crop resampling filters (``stalign prep --resample``); shards without the setting used Lanczos.
RESAMPLE_FILTERS = ("bilinear", "lanczos")
#: Most level pixels read at once for a group of neighbouring crops (``Slide.read_crops``).
UNION_MAX_PX = 2_000_000


def resample_filter(resample: int | str | None) -> int:
    """The PIL filter of ``resample``: a name of ``RESAMPLE_FILTERS``, a PIL filter, or None (Lanczos)."""
    from PIL import Image

    if resample is None:
        return Image.Resampling.LANCZOS
    if isinstance(resample, str):
        name = resample.lower()
        if name not in RESAMPLE_FILTERS:
            raise InputError(f"resample must be one of {', '.join(RESAMPLE_FILTERS)}; got {resample!r}")
        return Image.Resampling.LANCZOS if name == "lanczos" else Image.Resampling.BILINEAR
    return int(resample)


class _CropPlan(NamedTuple):
    level: int
    ix: int  # level pixels [ix, ix + n) x [iy, iy + m) to read
    iy: int
    n: int
    m: int
    box: tuple[float, float, float, float] | None  # resampling box in the region; None: the region is the crop
    padded: bool


def _union_groups(plans: list[_CropPlan], downsamples: tuple[float, ...]) -> list[list[int]]:
    """Indices of ``plans`` in runs (in order) read as one region: same level, an integral downsample (level
    pixels map to whole level-0 pixels, so a sub-window of a read equals its own read), the common region at most
    ``UNION_MAX_PX`` pixels and at most twice the pixels of the crops' own regions."""
    groups: list[list[int]] = []
    box = None  # x0, y0, x1, y1, own pixels of the current group
    for i, p in enumerate(plans):
        ds = downsamples[p.level]
        if box is not None and plans[groups[-1][0]].level == p.level and abs(ds - round(ds)) < 1e-9:
            x0, y0 = min(box[0], p.ix), min(box[1], p.iy)
            x1, y1 = max(box[2], p.ix + p.n), max(box[3], p.iy + p.m)
            own = box[4] + p.n * p.m
            area = (x1 - x0) * (y1 - y0)
            if area <= UNION_MAX_PX and area <= 2 * own:
                groups[-1].append(i)
                box = (x0, y0, x1, y1, own)
                continue
        groups.append([i])
        box = (p.ix, p.iy, p.ix + p.n, p.iy + p.m, p.n * p.m)
    return groups




class Slide:
    """An opened slide: level geometry, pixel size and crop reading (RGB uint8, white outside the image)."""

    def __init__(self, *, path: Path, backend: OpenSlideBackend | ArrayBackend, um_per_px: float | None,
                 pixel_size_source: str, pixel_size_note: str = "", user_um_per_px: float | None = None):
        self.path = path
        self._backend = backend
        self.um_per_px = um_per_px
        self.pixel_size_source = pixel_size_source
        self.pixel_size_note = pixel_size_note
        self._user_um_per_px = user_um_per_px

    # geometry -------------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self._backend.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self._backend.level_dimensions)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple(self._backend.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(self._backend.level_downsamples)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (level 0 when none is)."""
        best = 0
        for i, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + 1e-9) and ds >= self.level_downsamples[best]:
                best = i
        return best

    # reading --------------------------------------------------------------------------------------------
    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Pixels [x, x+w) x [y, y+h) of ``level`` as (h, w, 3) uint8; white where outside the level."""
        lw, lh = self._backend.level_dimensions[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 > x0 and y1 > y0:
            try:
                out[y0 - y:y1 - y, x0 - x:x1 - x] = self._backend.read(level, x0, y0, x1 - x0, y1 - y0)
            except SlideError:
                raise
            except Exception as exc:  # openslide/PIL/tifffile decode errors: corrupt or truncated data
                raise SlideError(f"{self.path}: cannot read pixels ({x0},{y0})+({x1 - x0}x{y1 - y0}) of level "
                                 f"{level}: {type(exc).__name__}: {exc}") from exc
        return out

    def read_region_level0(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels [x, x+w) x [y, y+h) as (h, w, 3) uint8, white outside the image."""
        return self._read_level(0, int(x), int(y), int(w), int(h))

    def _crop_plan(self, center_xy_px: Any, size_px: float, out_px: int) -> _CropPlan:
        """Where the crop around (x, y) lies: its level, the level pixels to read and the resampling box."""
        cx, cy = (float(v) for v in np.asarray(center_xy_px, dtype=np.float64).reshape(2))
        size, out_px = float(size_px), int(out_px)
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise CoordinateError(f"{self.path}: crop centre ({cx}, {cy}) is not finite")
        if not (size > 0 and math.isfinite(size)) or out_px <= 0:
            raise InputError(f"{self.path}: crop size must be > 0 (got size_px={size_px}, out_px={out_px})")
        width, height = self.dimensions
        x0, y0 = cx - size / 2, cy - size / 2
        padded = bool(x0 < 0 or y0 < 0 or x0 + size > width or y0 + size > height)
        level = self.best_level(size / out_px)
        ds = self.level_downsamples[level]
        lx, ly, ls = x0 / ds, y0 / ds, size / ds
        if abs(ls - out_px) < 1e-6 and abs(lx - round(lx)) < 1e-6 and abs(ly - round(ly)) < 1e-6:
            return _CropPlan(level, round(lx), round(ly), out_px, out_px, None, padded)
        margin = math.ceil(3 * max(ls / out_px, 1.0)) + 1  # filter support around the box
        ix, iy = math.floor(lx) - margin, math.floor(ly) - margin
        n = math.ceil(lx + ls) + margin - ix
        m = math.ceil(ly + ls) + margin - iy
        return _CropPlan(level, ix, iy, n, m, (lx - ix, ly - iy, lx - ix + ls, ly - iy + ls), padded)

    def read_crop(self, center_xy_px: Any, size_px: float, out_px: int, *,
                  resample: int | str | None = None) -> tuple[np.ndarray, bool]:
        """Square crop ``size_px`` level-0 px wide centred on (x, y), resampled to ``out_px``.

        Reads the coarsest level whose downsample is <= size_px / out_px and resamples with ``resample``
        (``"lanczos"``, ``"bilinear"`` or a PIL filter; None: Lanczos). Returns the (out_px, out_px, 3) uint8
        crop and whether it left the image (the outside is white).
        """
        crops, padded = self.read_crops(np.asarray(center_xy_px, dtype=np.float64).reshape(1, 2), size_px, out_px,
                                        resample=resample)
        return crops[0], bool(padded[0])

    def read_crops(self, centers: Any, size_px: float, out_px: int, *, resample: int | str | None = None,
                   out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``read_crop`` for each (x, y) row of ``centers``: ((N, out, out, 3) uint8, (N,) bool padded), written
        into ``out`` when given (e.g. shared memory).

        Crops whose level regions overlap or lie side by side (neighbouring spots in raster order) are cut
        from one read of their common region (at most ``UNION_MAX_PX`` pixels, and only where it is not much
        larger than the crops' own regions): the same pixels as reading each crop apart, fewer calls into the
        slide reader and each shared pixel converted once."""
        from PIL import Image

        filt = resample_filter(resample)
        centers = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        plans = [self._crop_plan(c, size_px, out_px) for c in centers]
        shape = (len(centers), int(out_px), int(out_px), 3)
        if out is not None and (out.shape != shape or out.dtype != np.uint8):
            raise ValueError(f"read_crops: out is {out.dtype} {out.shape}, expected uint8 {shape}")
        crops = np.empty(shape, dtype=np.uint8) if out is None else out
        padded = np.array([p.padded for p in plans], dtype=bool)
        for group in _union_groups(plans, self.level_downsamples):
            first = plans[group[0]]
            ux, uy = min(plans[i].ix for i in group), min(plans[i].iy for i in group)
            uw = max(plans[i].ix + plans[i].n for i in group) - ux
            uh = max(plans[i].iy + plans[i].m for i in group) - uy
            union = self._read_level(first.level, ux, uy, uw, uh)
            for i in group:
                p = plans[i]
                region = union[p.iy - uy:p.iy - uy + p.m, p.ix - ux:p.ix - ux + p.n]
                if p.box is None:
                    crops[i] = region
                else:
                    crops[i] = np.asarray(Image.fromarray(region).resize((int(out_px), int(out_px)), resample=filt,
                                                                         box=p.box))
        return crops, padded

    def set_tile_cache(self, capacity_bytes: int) -> None:
        """Size of the reader's cache of decoded tiles (openslide slides; others hold decoded levels): 0 for one
        pass over a whole level (a thumbnail), where cached tiles are never read again."""
        setter = getattr(self._backend, "set_tile_cache", None)
        if setter is not None:
            setter(capacity_bytes)

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """RGB thumbnail whose longer side is <= ``max_size``, and its downsample (level-0 px per thumb px)."""
        from PIL import Image

        width, height = self.dimensions
        target = max(width, height) / float(max_size)
        level = self.best_level(target)
        lw, lh = self._backend.level_dimensions[level]
        pixels = np.empty((lh, lw, 3), dtype=np.uint8)
        band = max(1, UNION_MAX_PX // max(lw, 1))  # read in bands: the reader's copies of a whole level
        for y in range(0, lh, band):              # (RGBA, alpha, RGB: ~18 bytes/px) never exist at once
            pixels[y:y + band] = self._read_level(level, 0, y, lw, min(band, lh - y))
        img = Image.fromarray(pixels)
        del pixels
        if max(lw, lh) > max_size:
            img.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8), width / img.size[0]

    # lifecycle ------------------------------------------------------------------------------------------
    def close(self) -> None:
        self._backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self):
        return _reopen, (os.fspath(self.path), self._user_um_per_px)

    def __repr__(self) -> str:
        return (f"Slide({str(self.path)!r}, dimensions={self.dimensions}, levels={self.level_count}, "
                f"um_per_px={self.um_per_px}, source={self.pixel_size_source!r})")


def _reopen(path: str, um_per_px: float | None) -> Slide:
    return open_slide(path, um_per_px=um_per_px)


def check_um_per_px(value: float, *, what: str) -> float:
    """``value`` as a float if it is a finite positive pixel size, else :class:`PixelSizeError`."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise PixelSizeError(f"{what}: pixel size {value!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise PixelSizeError(f"{what}: pixel size must be a finite number > 0 µm/px, got {value!r}")
    return v


def open_slide(path: str | os.PathLike, *, um_per_px: float | None = None) -> Slide:
    """Open a slide or image; ``um_per_px`` overrides the pixel size found in its metadata.

    A folder opens the first DICOM (``*.dcm``) file in it. Unopenable, truncated or corrupt files raise
    :class:`SlideError` naming the file. Metadata pixel sizes outside ``PLAUSIBLE_UM_PER_PX`` (such as the
    72 dpi default of many TIFF writers) are ignored and explained in ``Slide.pixel_size_note``.
    """
    path = Path(path)
    user = None if um_per_px is None else check_um_per_px(um_per_px, what=f"{path} (um_per_px flag)")
    if not path.exists():
        raise SlideError(f"{path}: slide file does not exist")
    backend = open_backend(path)
    mpp, source = backend.pixel_size()
    note = ""
    if mpp is not None and not (PLAUSIBLE_UM_PER_PX[0] <= mpp <= PLAUSIBLE_UM_PER_PX[1]):
        note = (f"ignored {source} = {mpp:.4g} µm/px: outside the plausible range "
                f"{PLAUSIBLE_UM_PER_PX[0]}-{PLAUSIBLE_UM_PER_PX[1]} µm/px (likely a default dpi, not a calibration)")
        mpp, source = None, "none"
    if user is not None:
        if mpp is not None:
            note = f"user flag overrides {source} = {mpp:.4g} µm/px"
        mpp, source = user, "user flag"
    return Slide(path=path, backend=backend, um_per_px=mpp, pixel_size_source=source if mpp is not None else "none",
                 pixel_size_note=note, user_um_per_px=user)


def write_pyramidal_tiff(path: str | os.PathLike, image: np.ndarray, *, um_per_px: float | None,
                         levels: int = 3, tile: int = 256) -> Path:
    """Write an in-memory RGB image as a tiled pyramidal TIFF that openslide opens (generic-tiff).

    Level 0 is a full-resolution page; each further page (``subfiletype=1``) halves the previous one (box
    filter). The resolution is stored in pixels per centimetre so the pixel size reads back as µm/px.
    """
    import tifffile
    from PIL import Image

    path = Path(path)
    kwargs: dict[str, Any] = {}
    if um_per_px is not None:
        res = 1e4 / check_um_per_px(um_per_px, what=str(path))
        kwargs = {"resolution": (res, res), "resolutionunit": "CENTIMETER"}
    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    with tifffile.TiffWriter(path) as tw:
        for level in range(levels):
            tw.write(np.asarray(img), tile=(tile, tile), photometric="rgb", compression="zlib",
                     subfiletype=0 if level == 0 else 1, metadata=None, **kwargs)
            if min(img.size) < 2:
                break
            img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BOX)
    return path
