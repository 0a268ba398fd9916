"""Layout and rendering of a synthetic H&E slide, written block by block into a pyramidal TIFF.

A ``SlideLayout`` holds coarse fields (tissue opacity, tissue class, nuclear density factor, fibre orientation; one
value per ``coarse_um`` cell) and the point lists of nuclei and holes. ``render_blocks`` turns it into RGB blocks of
256 rows; ``write_pyramid`` streams them into a tiled TIFF (level 0) while keeping a 4x-downsampled copy in a
temporary memory map for the lower levels, so memory stays bounded whatever the slide size.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stalign.lab.synth_stain import Look, stained_rgb
from stalign.lab.synth_texture import (
    StampBank,
    TissueClass,
    ellipse_bank,
    fibre_texture,
    grain_texture,
    isotropic_texture,
    periodic_take,
    smooth_noise,
    stain_to_rgb,
    stamp_into,
)

TILE = 256
HOLE_SCALES = np.array([0.6, 0.8, 1.0, 1.2, 1.4], dtype=np.float32)
VESSEL_EOSIN = 1.6  # extra eosin optical density of a capillary full of red blood cells


@dataclass
class Points:
    """Nuclei or holes: centres in µm, tissue class, stamp size/orientation index and a weight per point."""

    x_um: np.ndarray
    y_um: np.ndarray
    cls: np.ndarray
    size_idx: np.ndarray
    orient_idx: np.ndarray
    weight: np.ndarray

    def subset(self, mask: np.ndarray) -> Points:
        return Points(**{k: v[mask] for k, v in vars(self).items()})

    def __len__(self) -> int:
        return len(self.x_um)


@dataclass
class SlideLayout:
    """Everything needed to render a slide and to compute the ground truth at its spots."""

    um_per_px: float
    width_px: int
    height_px: int
    coarse_um: float
    classes: tuple[TissueClass, ...]
    class_map: np.ndarray  # (Hc, Wc) int16 class index per coarse cell
    tissue: np.ndarray  # (Hc, Wc) float32 tissue opacity 0..1
    density: np.ndarray  # (Hc, Wc) float32 nuclear density factor
    orient: np.ndarray  # (Hc, Wc) float32 weight of fibre texture A vs B
    nuclei: Points
    holes: Points
    nucleus_banks: tuple[StampBank, ...]
    hole_banks: tuple[StampBank | None, ...]
    vessels: Points | None = None  # synth v2: capillaries (red blood cells), drawn as dense eosin discs
    vessel_bank: StampBank | None = None

    def cell_of(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Coarse cell (row, col) holding each point."""
        hc, wc = self.class_map.shape
        r = np.clip((np.asarray(y_um) / self.coarse_um).astype(np.int64), 0, hc - 1)
        c = np.clip((np.asarray(x_um) / self.coarse_um).astype(np.int64), 0, wc - 1)
        return r, c


def build_layout(*, width_um: float, height_um: float, array_box: tuple[float, float, float, float],
                 classes: tuple[TissueClass, ...], um_per_px: float, rng: np.random.Generator,
                 coarse_um: float = 8.0, region_um: float = 700.0) -> SlideLayout:
    """Draw the tissue outline, class regions, density field, nuclei and holes of one slide (synth v1).

    The tissue is a noisy ellipse inscribed in ``array_box`` (x0, y0, x1, y1 in µm), so the box corners and the
    margin are glass; class regions are domain-warped Voronoi cells about ``region_um`` across.
    """
    grid = tissue_outline(width_um=width_um, height_um=height_um, array_box=array_box, rng=rng,
                          coarse_um=coarse_um)
    class_map = voronoi_classes(grid, array_box=array_box, n_classes=len(classes), region_um=region_um, rng=rng)
    return populate_layout(grid, class_map, classes=classes, um_per_px=um_per_px, rng=rng)


@dataclass(frozen=True)
class CoarseGrid:
    """Centres (µm) of the coarse cells of a slide and its tissue opacity on them."""

    gx: np.ndarray  # (Hc, Wc) float32 x of each cell centre
    gy: np.ndarray  # (Hc, Wc) float32 y of each cell centre
    tissue: np.ndarray  # (Hc, Wc) float32 opacity 0..1
    coarse_um: float
    width_um: float
    height_um: float


def tissue_outline(*, width_um: float, height_um: float, array_box: tuple[float, float, float, float],
                   rng: np.random.Generator, coarse_um: float = 8.0) -> CoarseGrid:
    """The coarse grid and a noisy tissue ellipse inscribed in ``array_box`` with a ~4 µm soft edge."""
    hc, wc = int(np.ceil(height_um / coarse_um)) + 1, int(np.ceil(width_um / coarse_um)) + 1
    cy, cx = (np.arange(hc, dtype=np.float32) + 0.5) * coarse_um, (np.arange(wc, dtype=np.float32) + 0.5) * coarse_um
    gy, gx = np.meshgrid(cy, cx, indexing="ij")
    x0, y0, x1, y1 = array_box
    ax, ay = (x1 - x0) / 2, (y1 - y0) / 2
    r = np.sqrt(((gx - (x0 + x1) / 2) / ax) ** 2 + ((gy - (y0 + y1) / 2) / ay) ** 2)
    r = r + 0.07 * smooth_noise((hc, wc), 200.0 / coarse_um, rng)
    edge = np.clip((r - 1.0) * (min(ax, ay) / 4.0), -60, 60)  # ~4 µm soft edge
    tissue = (1.0 / (1.0 + np.exp(edge))).astype(np.float32)
    return CoarseGrid(gx=gx, gy=gy, tissue=tissue, coarse_um=coarse_um, width_um=width_um, height_um=height_um)


def voronoi_classes(grid: CoarseGrid, *, array_box: tuple[float, float, float, float], n_classes: int,
                    region_um: float, rng: np.random.Generator) -> np.ndarray:
    """Class map (Hc, Wc) int16: domain-warped Voronoi regions about ``region_um`` across, one random class each."""
    from scipy.spatial import cKDTree

    x0, y0, x1, y1 = array_box
    hc, wc = grid.gx.shape
    n_regions = max(3 * n_classes, round((x1 - x0) * (y1 - y0) / region_um**2))
    seeds = np.column_stack([rng.uniform(x0, x1, n_regions), rng.uniform(y0, y1, n_regions)])
    region_class = rng.permutation(np.arange(n_regions) % n_classes)
    warp = 0.25 * region_um
    wx = grid.gx + warp * smooth_noise((hc, wc), 100.0 / grid.coarse_um, rng)
    wy = grid.gy + warp * smooth_noise((hc, wc), 100.0 / grid.coarse_um, rng)
    _, region = cKDTree(seeds).query(np.column_stack([wx.ravel(), wy.ravel()]))
    return region_class[region].reshape(hc, wc).astype(np.int16)


def populate_layout(grid: CoarseGrid, class_map: np.ndarray, *, classes: tuple[TissueClass, ...],
                    um_per_px: float, rng: np.random.Generator) -> SlideLayout:
    """Density and fibre fields, stamp banks, holes and nuclei (none inside a hole) for a given class map."""
    hc, wc = class_map.shape
    coarse_um, tissue = grid.coarse_um, grid.tissue
    density = np.exp(0.5 * smooth_noise((hc, wc), 60.0 / coarse_um, rng)).clip(0.35, 2.8).astype(np.float32)
    orient = (1.0 / (1.0 + np.exp(-3.0 * smooth_noise((hc, wc), 150.0 / coarse_um, rng)))).astype(np.float32)

    nucleus_banks = tuple(ellipse_bank(radius_um=c.nucleus_radius_um, elongation=c.elongation,
                                       um_per_px=um_per_px, rng=rng, chromatin=0.3) for c in classes)
    hole_banks = tuple(ellipse_bank(radius_um=c.hole_radius_um, elongation=1.15, um_per_px=um_per_px, rng=rng,
                                    scales=HOLE_SCALES, n_orientations=4) if c.holes_per_mm2 > 0 else None
                       for c in classes)
    cell_area_mm2 = (coarse_um / 1000.0) ** 2
    per_class = np.array([c.holes_per_mm2 for c in classes], dtype=np.float32)
    holes = _scatter(rng, per_class[class_map] * cell_area_mm2 * (tissue > 0.5), class_map, coarse_um,
                     n_sizes=len(HOLE_SCALES), n_orient=4, darkness=np.ones(len(classes), np.float32), jitter=0.0)
    per_class = np.array([c.nuclei_per_mm2 for c in classes], dtype=np.float32)
    nuclei = _scatter(rng, per_class[class_map] * density * tissue * cell_area_mm2, class_map, coarse_um,
                      n_sizes=len(nucleus_banks[0].radius_um), n_orient=nucleus_banks[0].stamps.shape[1],
                      darkness=np.array([c.darkness for c in classes], np.float32))
    layout = SlideLayout(um_per_px=um_per_px, width_px=int(np.ceil(grid.width_um / um_per_px)),
                         height_px=int(np.ceil(grid.height_um / um_per_px)), coarse_um=coarse_um,
                         classes=classes, class_map=class_map, tissue=tissue, density=density, orient=orient,
                         nuclei=nuclei, holes=holes, nucleus_banks=nucleus_banks, hole_banks=hole_banks)
    layout.nuclei = outside_holes(layout, nuclei)
    return layout


def outside_holes(layout: SlideLayout, points: Points) -> Points:
    """The ``points`` whose centres lie in no hole of ``layout``."""
    from scipy.spatial import cKDTree

    holes = layout.holes
    if not len(holes) or not len(points):
        return points
    hole_r = hole_radii(holes, layout.hole_banks)
    d, idx = cKDTree(np.column_stack([holes.x_um, holes.y_um])).query(
        np.column_stack([points.x_um, points.y_um]), k=min(4, len(holes)), distance_upper_bound=hole_r.max())
    d, idx = d.reshape(len(points), -1), idx.reshape(len(points), -1)
    radius = np.append(hole_r, 0.0)[idx]  # idx == len(holes) where nothing was found
    return points.subset(~(d < radius).any(axis=1))


def hole_radii(holes: Points, hole_banks: tuple[StampBank | None, ...]) -> np.ndarray:
    """Area-equivalent radius (µm) of each hole."""
    table = np.array([b.radius_um if b is not None else np.zeros(len(HOLE_SCALES)) for b in hole_banks],
                     dtype=np.float64)
    return table[holes.cls, holes.size_idx]


def _scatter(rng: np.random.Generator, lam: np.ndarray, class_map: np.ndarray, coarse_um: float, *,
             n_sizes: int, n_orient: int, darkness: np.ndarray, jitter: float = 0.15) -> Points:
    """Poisson points with intensity ``lam`` per coarse cell, uniform inside their cell.

    Each point's weight is its class ``darkness`` times a uniform factor in [1 - jitter, 1 + jitter].
    """
    counts = rng.poisson(lam.ravel())
    cell = np.repeat(np.arange(counts.size), counts)
    row, col = np.divmod(cell, class_map.shape[1])
    n = len(cell)
    cls = class_map.ravel()[cell].astype(np.int16)
    return Points(x_um=((col + rng.random(n)) * coarse_um).astype(np.float32),
                  y_um=((row + rng.random(n)) * coarse_um).astype(np.float32), cls=cls,
                  size_idx=rng.integers(0, n_sizes, n).astype(np.int16),
                  orient_idx=rng.integers(0, n_orient, n).astype(np.int16),
                  weight=(darkness[cls] * rng.uniform(1 - jitter, 1 + jitter, n)).astype(np.float32))


class _Interp:
    """Bilinear weights from pixel centres (one axis) onto coarse cell centres."""

    def __init__(self, n_px: int, um_per_px: float, coarse_um: float, n_cells: int) -> None:
        u = (np.arange(n_px, dtype=np.float64) + 0.5) * um_per_px / coarse_um - 0.5
        self.i0 = np.clip(np.floor(u).astype(np.int64), 0, n_cells - 2)
        self.w = np.clip(u - self.i0, 0.0, 1.0).astype(np.float32)[None, :]


def _by_class(points: Points, layout: SlideLayout, n_classes: int) -> list[dict[str, np.ndarray]]:
    """Per class: pixel centres (sorted by y), stamp indices and weights."""
    out = []
    for c in range(n_classes):
        p = points.subset(points.cls == c)
        order = np.argsort(p.y_um, kind="stable")
        p = p.subset(order)
        out.append({"x": np.floor(p.x_um / layout.um_per_px).astype(np.int64),
                    "y": np.floor(p.y_um / layout.um_per_px).astype(np.int64),
                    "size": p.size_idx, "orient": p.orient_idx, "weight": p.weight})
    return out


def _window(pts: dict[str, np.ndarray], key: str, lo: int, hi: int) -> dict[str, np.ndarray]:
    a, b = np.searchsorted(pts[key], [lo, hi])
    return {k: v[a:b] for k, v in pts.items()}


def render_blocks(layout: SlideLayout, *, rng: np.random.Generator, block_w: int = 2048,
                  progress: bool = True, look: Look | None = None) -> Iterator[np.ndarray]:
    """RGB uint8 blocks (TILE, block_w, 3) in row-major order over the slide padded to whole tiles.

    ``look`` (synth v3): the slide's stain and scanner, an isotropic matrix texture for the classes without
    aligned fibres, and lumina that hold eosin (secretion) instead of glass."""
    from tqdm import tqdm

    h_pad = -(-layout.height_px // TILE) * TILE
    w_pad = -(-layout.width_px // TILE) * TILE
    block_w = min(block_w, w_pad)
    n_cls = len(layout.classes)
    cls_idx = layout.class_map.astype(np.int64)
    fields = np.stack([layout.tissue,
                       np.array([c.haem_bg for c in layout.classes], np.float32)[cls_idx],
                       np.array([c.eosin for c in layout.classes], np.float32)[cls_idx],
                       np.array([c.fibres for c in layout.classes], np.float32)[cls_idx],
                       layout.orient, *([np.array(look.aniso, np.float32)[cls_idx]] if look else [])])
    hc, wc = layout.class_map.shape
    ix = _Interp(w_pad, layout.um_per_px, layout.coarse_um, wc)
    iy = _Interp(h_pad, layout.um_per_px, layout.coarse_um, hc)
    fib_a = fibre_texture(angle=0.5, um_per_px=layout.um_per_px, rng=rng)
    fib_b = fibre_texture(angle=2.1, um_per_px=layout.um_per_px, rng=rng)
    grain = grain_texture(rng=rng)
    iso = isotropic_texture(um_per_px=layout.um_per_px, rng=rng) if look else None
    nuclei = _by_class(layout.nuclei, layout, n_cls)
    holes = _by_class(layout.holes, layout, n_cls)
    vessels = _by_class(layout.vessels, layout, 1)[0] if layout.vessels is not None else None
    for y0 in tqdm(range(0, h_pad, TILE), desc="synth rows", unit="row", disable=not progress, leave=False):
        rows = np.arange(y0, y0 + TILE)
        r0, wy = iy.i0[rows], iy.w[0, rows][:, None]
        lo, hi = int(r0.min()), int(r0.max()) + 2
        strip_fields = fields[:, lo:hi]  # (5, rows of coarse cells, wc)
        strip_nuc = [_sort_x(_window(nuclei[c], "y", y0 - b.half, y0 + TILE + b.half))
                     for c, b in enumerate(layout.nucleus_banks)]
        strip_hole = [_sort_x(_window(holes[c], "y", y0 - b.half, y0 + TILE + b.half)) if b is not None else None
                      for c, b in enumerate(layout.hole_banks)]
        strip_ves = (_sort_x(_window(vessels, "y", y0 - layout.vessel_bank.half, y0 + TILE + layout.vessel_bank.half))
                     if vessels is not None else None)
        for x0 in range(0, w_pad, block_w):
            bw = min(block_w, w_pad - x0)
            cols = np.arange(x0, x0 + bw)
            c0, wx = ix.i0[cols], ix.w[:, cols]
            horiz = strip_fields[:, :, c0] * (1 - wx) + strip_fields[:, :, c0 + 1] * wx  # (5, rows_c, bw)
            f = horiz[:, r0 - lo] * (1 - wy) + horiz[:, r0 - lo + 1] * wy  # (5, TILE, bw)
            tissue, haem_bg, eosin, fibres, orient = f[:5]
            nuc = np.zeros((TILE, bw), np.float32)
            hole = np.zeros((TILE, bw), np.float32)
            for c in range(n_cls):
                _stamp_window(nuc, layout.nucleus_banks[c], strip_nuc[c], x0, y0)
                if strip_hole[c] is not None:
                    _stamp_window(hole, layout.hole_banks[c], strip_hole[c], x0, y0)
            open_ = 1.0 - np.clip(hole, 0.0, 1.0)
            fib = orient * periodic_take(fib_a, rows, cols) + (1 - orient) * periodic_take(fib_b, rows, cols)
            if look:
                fib = f[5] * fib + (1 - f[5]) * periodic_take(iso, rows, cols)
            haem = (haem_bg + np.minimum(nuc, 2.0)) * open_
            eos = eosin * (1.0 + fibres * (2.0 * fib - 1.0)) * (open_ if look is None else 1.0)
            if strip_ves is not None:
                ves = np.zeros((TILE, bw), np.float32)
                _stamp_window(ves, layout.vessel_bank, strip_ves, x0, y0)
                eos = eos + VESSEL_EOSIN * np.minimum(ves, 1.0) * open_
            g = periodic_take(grain, rows, cols)
            yield (stain_to_rgb(haem=haem, eosin=eos, tissue=tissue, grain=g) if look is None
                   else stained_rgb(haem=haem, eosin=eos, tissue=tissue, grain=g, stain=look.stain))


def _sort_x(pts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    order = np.argsort(pts["x"], kind="stable")
    return {k: v[order] for k, v in pts.items()}


def _stamp_window(out: np.ndarray, bank: StampBank, pts: dict[str, np.ndarray], x0: int, y0: int) -> None:
    p = _window(pts, "x", x0 - bank.half, x0 + out.shape[1] + bank.half)
    stamp_into(out, bank, xs=p["x"], ys=p["y"], size_idx=p["size"], orient_idx=p["orient"],
               weight=p["weight"], x0=x0, y0=y0)


def _downsample4(a: np.ndarray) -> np.ndarray:
    """Area-average 4x4 downsampling of an (h, w, 3) uint8 array (edges padded by replication)."""
    h, w = a.shape[:2]
    ph, pw = -h % 4, -w % 4
    if ph or pw:
        a = np.pad(a, ((0, ph), (0, pw), (0, 0)), mode="edge")
    a = a.astype(np.uint16)
    rows = a[0::4] + a[1::4] + a[2::4] + a[3::4]
    total = rows[:, 0::4] + rows[:, 1::4] + rows[:, 2::4] + rows[:, 3::4]
    return ((total + 8) // 16).astype(np.uint8)


def _array_tiles(a: np.ndarray) -> Iterator[np.ndarray]:
    """Full (TILE, TILE, 3) tiles of ``a`` in row-major order, zero-padded at the right and bottom edges."""
    h, w = a.shape[:2]
    for y in range(0, h, TILE):
        strip = np.asarray(a[y:y + TILE])
        if strip.shape[0] < TILE:
            strip = np.pad(strip, ((0, TILE - strip.shape[0]), (0, 0), (0, 0)))
        strip = np.pad(strip, ((0, 0), (0, -w % TILE), (0, 0)))
        for x in range(0, w, TILE):
            yield strip[:, x:x + TILE]


def _downsample4_chunked(a: np.ndarray, rows: int = 2048) -> np.ndarray:
    """``_downsample4`` of a (possibly memory-mapped) array, reading ``rows`` rows at a time."""
    return np.concatenate([_downsample4(np.asarray(a[y:y + rows])) for y in range(0, a.shape[0], rows)])


def _level0_tiles(blocks: Iterator[np.ndarray], level1: np.ndarray, w_pad: int) -> Iterator[np.ndarray]:
    """Tiles of the level-0 ``blocks`` in order, storing each block 4x-downsampled into ``level1`` on the way."""
    x = y = 0
    for block in blocks:
        bw = block.shape[1]
        level1[y // 4:(y + TILE) // 4, x // 4:(x + bw) // 4] = _downsample4(block)
        for tx in range(0, bw, TILE):
            yield block[:, tx:tx + TILE]
        x += bw
        if x >= w_pad:
            x, y = 0, y + TILE


def write_pyramid(path: str | os.PathLike, blocks: Iterator[np.ndarray], *, height: int, width: int,
                  um_per_px: float, min_size: int = 512, compress_level: int = 1) -> list[tuple[int, int]]:
    """Write ``blocks`` (from ``render_blocks``) as a tiled, deflate-compressed pyramidal TIFF.

    Levels are 4x apart (``subfiletype=1``) until the longer side is at most ``min_size``; the resolution tags
    are in pixels per centimetre so µm/px is recoverable (openslide reports it as ``openslide.mpp-x``).
    Returns the (height, width) of every level.
    """
    import tifffile

    from stofm.util.output_paths import atomic_write_path

    path = Path(path)
    h1, w1 = -(-height // 4), -(-width // 4)
    h_pad, w_pad = -(-height // TILE) * TILE, -(-width // TILE) * TILE
    common = {"photometric": "rgb", "compression": "zlib", "compressionargs": {"level": compress_level},
              "resolutionunit": "CENTIMETER", "metadata": None, "maxworkers": 2, "buffersize": 16 << 20}
    shapes = [(height, width)]
    res = 1e4 / um_per_px
    with atomic_write_path(path) as partial, tempfile.TemporaryDirectory(dir=path.parent, prefix=".synth-") as tmp, \
            tifffile.TiffWriter(partial, bigtiff=True) as tw:
        level1 = np.memmap(Path(tmp) / "level1.u8", dtype=np.uint8, mode="w+", shape=(h_pad // 4, w_pad // 4, 3))
        tw.write(_level0_tiles(blocks, level1, w_pad), shape=(height, width, 3), dtype=np.uint8,
                 tile=(TILE, TILE), subfiletype=0, resolution=(res, res), **common)
        level, ds = level1[:h1, :w1], 4
        while max(shapes[-1]) > min_size:
            shapes.append(level.shape[:2])
            tw.write(_array_tiles(level), shape=level.shape, dtype=np.uint8, tile=(TILE, TILE), subfiletype=1,
                     resolution=(res / ds, res / ds), **common)
            level, ds = _downsample4_chunked(level), ds * 4
        del level, level1
    return shapes
