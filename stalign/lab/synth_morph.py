"""Tissue classes of synth v3: the same mean stain, told apart by morphology alone.

Every class has the same background haematoxylin and eosin, the same fibre strength, the same mean optical density
per nucleus and the same expected nuclear area fraction (``NAF_TARGET``: density x mean nuclear area), so the mean
colour of a class is the same; the classes differ in nuclear size, elongation, chromatin texture (speckle), density,
arrangement (scattered, rosettes around a lumen like glands, single-file rows) and stroma fibre shape (aligned
fibres vs an isotropic matrix of the same strength). Gland lumina hold pale eosinophilic secretion (no white), and
their class gets a little more background haematoxylin so that its mean stays level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stalign.lab.synth_render import HOLE_SCALES, CoarseGrid, Points, SlideLayout, _scatter, outside_holes
from stalign.lab.synth_texture import (
    N_ORIENTATIONS,
    SIZE_SCALES,
    StampBank,
    TissueClass,
    ellipse_bank,
    smooth_noise,
)

NAF_TARGET = 0.15  # expected nuclear area fraction of every class
NUCLEUS_OD = 1.1  # mean haematoxylin OD of a nucleus after its chromatin speckle (peaks stay below the 2.0 cap)
HAEM_BG, EOSIN, FIBRES = 0.12, 0.55, 0.35
ROSETTE_NUCLEI, ROW_NUCLEI = 8, 6
LUMEN_RADIUS_UM = 7.0
FIBRE_ANGLES = (0.5, 2.1)  # the two fibre directions of the renderer (radians; texture A where orient > 0.5)


@dataclass(frozen=True)
class MorphClass(TissueClass):
    """A v3 tissue class: ``TissueClass`` plus chromatin speckle, arrangement and fibre anisotropy."""

    chromatin: float = 0.3  # 0: homogeneous nucleus, 1: coarse speckle
    arrangement: str = "scatter"
    fibre_aniso: float = 0.0  # 1: aligned fibres (stroma), 0: isotropic matrix


def _cls(name: str, radius: float, elongation: float, chromatin: float, arrangement: str = "scatter",
         aniso: float = 0.0) -> MorphClass:
    density = NAF_TARGET / (np.pi * radius**2 * float(np.mean(SIZE_SCALES**2)) * 1e-6)
    lumen = 0.0
    haem_bg = HAEM_BG
    if arrangement == "rosette":  # lumen share of the area, compensated in the background haematoxylin
        lumen = density / ROSETTE_NUCLEI * np.pi * LUMEN_RADIUS_UM**2 * float(np.mean(HOLE_SCALES**2)) * 1e-6
        haem_bg = HAEM_BG / (1.0 - lumen)
    return MorphClass(name=name, nuclei_per_mm2=round(float(density), 1), nucleus_radius_um=radius,
                      elongation=elongation, darkness=round(NUCLEUS_OD / (1.0 - chromatin / 2.0), 6), eosin=EOSIN,
                      fibres=FIBRES, haem_bg=round(float(haem_bg), 6),
                      holes_per_mm2=round(float(density / ROSETTE_NUCLEI), 1) if arrangement == "rosette" else 0.0,
                      hole_radius_um=LUMEN_RADIUS_UM if arrangement == "rosette" else 0.0, chromatin=chromatin,
                      arrangement=arrangement, fibre_aniso=aniso)


MORPH_CLASSES: tuple[MorphClass, ...] = (
    _cls("tumour", 4.5, 1.3, 0.7),  # large, coarse (vesicular) chromatin, sparse
    _cls("stroma", 2.5, 3.5, 0.2, aniso=1.0),  # spindles along aligned fibres
    _cls("immune", 2.2, 1.05, 0.05),  # small, round, homogeneous, dense
    _cls("gland", 3.2, 1.6, 0.3, "rosette"),  # radially elongated nuclei around a lumen
    _cls("lobular", 2.8, 1.3, 0.3, "rows"),  # single-file rows
    _cls("necrosis", 1.3, 1.2, 0.5),  # many small fragments
)


def populate_morph_layout(grid: CoarseGrid, class_map: np.ndarray, *, classes: tuple[MorphClass, ...],
                          um_per_px: float, rng: np.random.Generator) -> SlideLayout:
    """Like ``synth_render.populate_layout`` (density and fibre fields, banks, lumina, nuclei) for v3 classes:
    nuclei scattered, in rosettes around the lumina or in rows, stroma spindles along the local fibre direction."""
    hc, wc = class_map.shape
    coarse_um, tissue = grid.coarse_um, grid.tissue
    density = np.exp(0.5 * smooth_noise((hc, wc), 60.0 / coarse_um, rng)).clip(0.35, 2.8).astype(np.float32)
    orient = (1.0 / (1.0 + np.exp(-3.0 * smooth_noise((hc, wc), 150.0 / coarse_um, rng)))).astype(np.float32)
    nucleus_banks = tuple(_true_area(ellipse_bank(radius_um=c.nucleus_radius_um, elongation=c.elongation,
                                                  um_per_px=um_per_px, rng=rng, chromatin=c.chromatin),
                                     c.chromatin, um_per_px) for c in classes)
    hole_banks = tuple(ellipse_bank(radius_um=c.hole_radius_um, elongation=1.15, um_per_px=um_per_px, rng=rng,
                                    scales=HOLE_SCALES, n_orientations=4) if c.arrangement == "rosette" else None
                       for c in classes)
    cell_mm2 = (coarse_um / 1000.0) ** 2
    base = density * tissue * cell_mm2
    ones = np.ones(len(classes), np.float32)
    parts, holes = [], []
    for k, c in enumerate(classes):
        lam = np.where(class_map == k, c.nuclei_per_mm2 * base, 0.0)
        if c.arrangement == "rosette":
            centres = _scatter(rng, lam / ROSETTE_NUCLEI, class_map, coarse_um, n_sizes=len(HOLE_SCALES),
                               n_orient=4, darkness=ones, jitter=0.0)
            holes.append(centres)
            ring = LUMEN_RADIUS_UM * HOLE_SCALES[centres.size_idx] + 0.8 * c.nucleus_radius_um * np.sqrt(c.elongation)
            parts.append(_around(centres, ring, ROSETTE_NUCLEI, c, k, rng, radial=True))
        elif c.arrangement == "rows":
            centres = _scatter(rng, lam / ROW_NUCLEI, class_map, coarse_um, n_sizes=1, n_orient=1, darkness=ones)
            parts.append(_rows(centres, _fibre_angle(orient, centres, coarse_um, rng), c, k, rng))
        else:
            p = _scatter(rng, lam, class_map, coarse_um, n_sizes=len(SIZE_SCALES), n_orient=N_ORIENTATIONS,
                         darkness=np.full(len(classes), c.darkness, np.float32))
            if c.fibre_aniso > 0:  # spindles along the fibres
                p.orient_idx = _orient_idx(_fibre_angle(orient, p, coarse_um, rng))
            parts.append(p)
    nuclei = _concat(parts)
    hole_pts = _concat(holes) if holes else _concat([nuclei.subset(np.zeros(len(nuclei), bool))])
    layout = SlideLayout(um_per_px=um_per_px, width_px=int(np.ceil(grid.width_um / um_per_px)),
                         height_px=int(np.ceil(grid.height_um / um_per_px)), coarse_um=coarse_um, classes=classes,
                         class_map=class_map, tissue=tissue, density=density, orient=orient, nuclei=nuclei,
                         holes=hole_pts, nucleus_banks=nucleus_banks, hole_banks=hole_banks)
    layout.nuclei = outside_holes(layout, nuclei)
    return layout


def _true_area(bank: StampBank, chromatin: float, um_per_px: float) -> StampBank:
    """Stamps scaled so each one's sum is its nominal area (px) x the chromatin's mean: the soft edge of a small
    nucleus at a coarse pixel size would otherwise add relatively more stain than that of a large one."""
    area_px = np.pi * (bank.radius_um / um_per_px) ** 2 * (1.0 - chromatin / 2.0)
    sums = bank.stamps.sum(axis=(2, 3))
    return StampBank(stamps=(bank.stamps * (area_px[:, None] / sums)[:, :, None, None]).astype(np.float32),
                     radius_um=bank.radius_um)


def _fibre_angle(orient: np.ndarray, p: Points, coarse_um: float, rng: np.random.Generator) -> np.ndarray:
    hc, wc = orient.shape
    r = np.clip((p.y_um / coarse_um).astype(np.int64), 0, hc - 1)
    c = np.clip((p.x_um / coarse_um).astype(np.int64), 0, wc - 1)
    return np.where(orient[r, c] > 0.5, FIBRE_ANGLES[0], FIBRE_ANGLES[1]) + rng.normal(0.0, 0.15, len(p))


def _orient_idx(angle: np.ndarray) -> np.ndarray:
    return (np.round(np.mod(angle, np.pi) / (np.pi / N_ORIENTATIONS)).astype(np.int64) % N_ORIENTATIONS
            ).astype(np.int16)


def _nuclei(x: np.ndarray, y: np.ndarray, angle: np.ndarray, c: MorphClass, k: int,
            rng: np.random.Generator) -> Points:
    n = len(x)
    return Points(x_um=x.astype(np.float32), y_um=y.astype(np.float32), cls=np.full(n, k, np.int16),
                  size_idx=rng.integers(0, len(SIZE_SCALES), n).astype(np.int16), orient_idx=_orient_idx(angle),
                  weight=(c.darkness * rng.uniform(0.85, 1.15, n)).astype(np.float32))


def _around(centres: Points, ring_um: np.ndarray, m: int, c: MorphClass, k: int, rng: np.random.Generator, *,
            radial: bool) -> Points:
    """``m`` nuclei evenly on a ring of ``ring_um`` around each centre, elongated along the radius."""
    phase = rng.uniform(0, 2 * np.pi, len(centres))
    ang = phase[:, None] + 2 * np.pi * np.arange(m)[None, :] / m
    x = centres.x_um[:, None] + ring_um[:, None] * np.cos(ang)
    y = centres.y_um[:, None] + ring_um[:, None] * np.sin(ang)
    return _nuclei(x.ravel(), y.ravel(), (ang if radial else ang + np.pi / 2).ravel(), c, k, rng)


def _rows(centres: Points, angle: np.ndarray, c: MorphClass, k: int, rng: np.random.Generator) -> Points:
    """``ROW_NUCLEI`` nuclei in single file along ``angle`` through each centre, 2.4 nuclear radii apart."""
    step = 2.4 * c.nucleus_radius_um * (np.arange(ROW_NUCLEI) - (ROW_NUCLEI - 1) / 2)
    x = centres.x_um[:, None] + step[None, :] * np.cos(angle)[:, None]
    y = centres.y_um[:, None] + step[None, :] * np.sin(angle)[:, None]
    return _nuclei(x.ravel(), y.ravel(), np.repeat(angle, ROW_NUCLEI), c, k, rng)


def _concat(parts: list[Points]) -> Points:
    return Points(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in vars(parts[0])})
