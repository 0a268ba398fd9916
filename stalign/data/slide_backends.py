"""Pixel sources behind :class:`stalign.data.slide.Slide`: openslide, or in-memory levels from PIL / tifffile.

A backend exposes ``level_dimensions`` ((w, h) per level), ``level_downsamples``, ``read(level, x, y, w, h)``
(in-bounds level pixels as (h, w, 3) uint8 RGB), ``pixel_size()`` -> (µm/px or None, source) and ``close()``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from stalign.data.errors import SlideError
from stofm.util.limits import LIMITS, limit

PLAIN_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_UM_PER_UNIT = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """Any gray/RGB/RGBA, uint8/uint16/float/bool array -> (h, w, 3) uint8; alpha composited on white."""
    arr = np.asarray(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = np.clip(np.nan_to_num(arr) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    channels = arr.shape[-1]
    if channels in (2, 4):  # gray+alpha or RGBA
        if arr[..., -1].min() == 255:
            arr = arr[..., :-1]
        else:
            color, alpha = arr[..., :-1].astype(np.uint16), arr[..., -1:].astype(np.uint16)
            arr = ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.shape[-1] != 3:
        raise ValueError(f"unsupported number of colour channels {channels}")
    return np.ascontiguousarray(arr)


class OpenSlideBackend:
    """A slide read through openslide (all its formats, pyramids, tiles read on demand)."""

    def __init__(self, path: Path):
        import openslide

        self.path = path
        self.osr = openslide.OpenSlide(str(path))
        self.level_dimensions = [tuple(map(int, d)) for d in self.osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self.osr.level_downsamples]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        from PIL import Image

        img = self.osr.read_region((round(x * ds), round(y * ds)), level, (int(w), int(h)))
        if img.getchannel("A").getextrema()[0] < 255:  # transparent (not scanned) pixels: composite on white
            white = Image.new("RGBA", img.size, (255, 255, 255, 255))
            white.alpha_composite(img)
            img = white
        return np.asarray(img.convert("RGB"))

    def set_tile_cache(self, capacity_bytes: int) -> None:
        """Give this slide its own decoded-tile cache of ``capacity_bytes`` (OpenSlide >= 4; default 32 MiB)."""
        import openslide

        if hasattr(openslide, "OpenSlideCache") and hasattr(self.osr, "set_cache"):
            self.osr.set_cache(openslide.OpenSlideCache(int(capacity_bytes)))

    def pixel_size(self) -> tuple[float | None, str]:
        props = self.osr.properties
        try:
            mx, my = float(props["openslide.mpp-x"]), float(props.get("openslide.mpp-y", props["openslide.mpp-x"]))
        except (KeyError, ValueError):
            return None, "none"
        kind = "TIFF resolution tags" if props.get("openslide.vendor") == "generic-tiff" else "slide metadata"
        return (mx + my) / 2, f"{kind} (openslide.mpp-x)"

    def close(self) -> None:
        self.osr.close()


class ArrayBackend:
    """Levels held in memory (decoded on first use): plain images and TIFFs openslide cannot read."""

    def __init__(self, path: Path, *, loaders: list[Callable[[], np.ndarray]], dims: list[tuple[int, int]],
                 pixel_size: tuple[float | None, str], close: Callable[[], None] | None = None):
        self.path = path
        self._loaders = loaders
        self._levels: dict[int, np.ndarray] = {}
        self.level_dimensions = dims
        self.level_downsamples = [dims[0][0] / d[0] for d in dims]
        self._pixel_size = pixel_size
        self._close = close

    def level(self, level: int) -> np.ndarray:
        if level not in self._levels:
            arr = to_rgb(self._loaders[level]())
            if (arr.shape[1], arr.shape[0]) != tuple(self.level_dimensions[level]):
                raise SlideError(f"{self.path}: level {level} decoded to {arr.shape[1]}x{arr.shape[0]} px, "
                                 f"expected {self.level_dimensions[level]}")
            self._levels[level] = arr
        return self._levels[level]

    def read(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        return self.level(level)[y:y + h, x:x + w]

    def pixel_size(self) -> tuple[float | None, str]:
        return self._pixel_size

    def close(self) -> None:
        self._levels.clear()
        if self._close is not None:
            self._close()
            self._close = None


#: Most pixels of a plain image (JPEG, PNG, ...), which is decoded whole into memory (3-4 bytes a pixel, more while
#: PIL converts it): 2**31 px (e.g. 46,000²) is ~8 GiB. PIL's own decompression-bomb limit (89 Mpx) would refuse
#: legitimate whole-slide JPEGs, so it is raised to this bound while a plain image opens, never switched off.
MAX_PLAIN_IMAGE_PIXELS = 2 ** 31


def _pil_backend(path: Path) -> ArrayBackend:
    import warnings

    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    bound = limit("image_pixels", default=MAX_PLAIN_IMAGE_PIXELS)  # STALIGN_MAX_IMAGE_PIXELS raises it
    Image.MAX_IMAGE_PIXELS = int(bound)  # PIL warns above it and refuses above twice it
    too_big = (f"is more than a plain image may hold ({bound:,.0f} px: it is decoded whole into memory; "
               f"{LIMITS['image_pixels'].variable} raises it); convert it to a tiled pyramidal TIFF (e.g. `vips "
               "tiffsave IN OUT.tif --tile --pyramid`)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused just below, with a hint
            try:
                img = Image.open(path)
            except Image.DecompressionBombError:  # PIL's own refusal above twice the bound
                raise SlideError(f"{path}: the image {too_big}") from None
        with img:
            width, height = img.size
            if width * height > bound:
                raise SlideError(f"{path}: {width} x {height} px {too_big}")
            img.load()
            dpi = img.info.get("dpi")
            if img.mode in ("P", "PA"):
                img = img.convert("RGBA")
            elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I;16"):
                img = img.convert("RGB")
            arr = np.asarray(img)
    finally:
        Image.MAX_IMAGE_PIXELS = old
    mpp = (None, "none")
    if dpi and float(dpi[0]) > 0:
        mpp = (25400.0 / float(dpi[0]), "image dpi metadata")
    backend = ArrayBackend(path, loaders=[lambda: arr], dims=[(arr.shape[1], arr.shape[0])], pixel_size=mpp)
    backend.level(0)
    return backend


def _tiff_pixel_size(page) -> tuple[float | None, str]:
    tags = page.tags
    unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
    if "XResolution" not in tags or int(unit) not in _UM_PER_UNIT:
        return None, "none"
    num, den = tags["XResolution"].value
    if not num or not den:
        return None, "none"
    return _UM_PER_UNIT[int(unit)] * den / num, "TIFF resolution tags"


def _tifffile_backend(path: Path) -> ArrayBackend:
    import tifffile

    tif = tifffile.TiffFile(path)
    try:
        series = tif.series[0]
        levels = list(series.levels)
        dims, loaders = [], []
        for lev in levels:
            axes = lev.axes
            if "X" not in axes or "Y" not in axes:
                raise ValueError(f"series axes {axes!r} have no Y/X")
            extra = [a for a, n in zip(axes, lev.shape) if a not in "YXS" and n != 1]
            if extra:
                raise ValueError(f"multi-plane image (axes {axes!r}, shape {lev.shape}) is not an RGB slide")
            dims.append((lev.shape[axes.index("X")], lev.shape[axes.index("Y")]))
            loaders.append(lambda lev=lev: _to_yxs(lev.asarray(), lev.axes))
        backend = ArrayBackend(path, loaders=loaders, dims=dims, pixel_size=_tiff_pixel_size(levels[0].pages[0]),
                               close=tif.close)
        backend.level(len(dims) - 1)  # decode the smallest level now: catches truncated files at open
    except Exception:
        tif.close()
        raise
    return backend


def _to_yxs(arr: np.ndarray, axes: str) -> np.ndarray:
    for a in [a for a in axes if a not in "YXS"]:
        arr = arr.take(0, axis=axes.index(a))
        axes = axes.replace(a, "")
    order = [axes.index(a) for a in "YXS" if a in axes]
    return np.transpose(arr, order)


def _validate_openslide(backend: OpenSlideBackend) -> None:
    """Read the smallest level (or a corner of it) so truncated or corrupt files fail at open."""
    level = len(backend.level_dimensions) - 1
    w, h = backend.level_dimensions[level]
    tile = 1024
    for x, y in {(0, 0), (max(w - tile, 0), max(h - tile, 0))}:
        backend.read(level, x, y, min(w, tile), min(h, tile))


def open_backend(path: Path) -> OpenSlideBackend | ArrayBackend:
    """Pick and open a backend for ``path``; any failure becomes :class:`SlideError` naming the file."""
    target = path
    if path.is_dir():
        dicoms = sorted(path.glob("*.dcm"))
        if not dicoms:
            raise SlideError(f"{path}: a folder slide must hold DICOM (*.dcm) files; none found")
        target = dicoms[0]
    suffix = target.suffix.lower()
    attempts: list[tuple[str, Callable[[], OpenSlideBackend | ArrayBackend]]] = []
    if suffix not in PLAIN_SUFFIXES:
        attempts.append(("openslide", lambda: _opened(OpenSlideBackend(target))))
    if suffix in TIFF_SUFFIXES:
        attempts.append(("tifffile", lambda: _tifffile_backend(target)))
    if suffix not in TIFF_SUFFIXES:
        attempts.append(("PIL", lambda: _pil_backend(target)))
    errors = []
    for name, attempt in attempts:
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - each reader fails its own way; all are reported below
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    raise SlideError(f"{path}: cannot open as a slide image (unsupported, truncated or corrupt file) - "
                     + "; ".join(errors))


def _opened(backend: OpenSlideBackend) -> OpenSlideBackend:
    try:
        _validate_openslide(backend)
    except Exception:
        backend.close()
        raise
    return backend
