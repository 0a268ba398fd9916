"""Texture primitives of the synthetic H&E generator: tissue classes, stamp banks, periodic textures, stain model.

Everything here is vectorised numpy. Nuclei and holes (fat cells, gland lumina) are drawn by adding pre-rendered
stamps into a block with ``np.bincount``; fibres and grain come from periodic pre-rendered textures; the colour
follows the Beer-Lambert stain model (optical density = haematoxylin * H + eosin * E).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Ruifrok & Johnston stain vectors (optical density per R, G, B), unit length.
HAEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286], dtype=np.float32)
EOSIN_OD = np.array([0.072, 0.990, 0.105], dtype=np.float32)
GLASS_OD = 0.045
TEXTURE_PERIOD = 1024  # px; periodic textures wrap around


@dataclass(frozen=True)
class TissueClass:
    """Look of one tissue class: nuclei, stroma fibres, holes and stain levels."""

    name: str
    nuclei_per_mm2: float
    nucleus_radius_um: float
    elongation: float  # major/minor axis ratio of the nuclei
    darkness: float  # haematoxylin optical density of a nucleus
    eosin: float  # eosin optical density of the background
    fibres: float  # 0..1, strength of the fibre texture
    haem_bg: float  # haematoxylin optical density of the background
    holes_per_mm2: float = 0.0  # fat cells / gland lumina
    hole_radius_um: float = 0.0


TISSUE_CLASSES: tuple[TissueClass, ...] = (
    TissueClass(name="tumour", nuclei_per_mm2=9_000, nucleus_radius_um=4.0, elongation=1.4, darkness=1.5,
                eosin=0.45, fibres=0.1, haem_bg=0.18),
    TissueClass(name="stroma", nuclei_per_mm2=2_500, nucleus_radius_um=2.2, elongation=3.0, darkness=1.3,
                eosin=0.70, fibres=0.7, haem_bg=0.06),
    TissueClass(name="immune", nuclei_per_mm2=22_000, nucleus_radius_um=2.6, elongation=1.05, darkness=1.7,
                eosin=0.35, fibres=0.05, haem_bg=0.12),
    TissueClass(name="adipose", nuclei_per_mm2=800, nucleus_radius_um=2.4, elongation=2.0, darkness=1.2,
                eosin=0.50, fibres=0.2, haem_bg=0.05, holes_per_mm2=330, hole_radius_um=24),
    TissueClass(name="gland", nuclei_per_mm2=9_000, nucleus_radius_um=3.4, elongation=1.5, darkness=1.3,
                eosin=0.55, fibres=0.1, haem_bg=0.15, holes_per_mm2=60, hole_radius_um=16),
    TissueClass(name="necrosis", nuclei_per_mm2=3_000, nucleus_radius_um=1.6, elongation=1.2, darkness=1.0,
                eosin=0.85, fibres=0.0, haem_bg=0.25),
)

SIZE_SCALES = np.array([0.75, 0.875, 1.0, 1.125, 1.25], dtype=np.float32)
N_ORIENTATIONS = 8


@dataclass(frozen=True)
class StampBank:
    """Pre-rendered stamps (n_sizes, n_orientations, S, S) in [0, 1] with their radii in µm."""

    stamps: np.ndarray
    radius_um: np.ndarray  # (n_sizes,) area-equivalent radius

    @property
    def half(self) -> int:
        return self.stamps.shape[-1] // 2

    def area_um2(self, size_idx: np.ndarray) -> np.ndarray:
        return np.pi * self.radius_um[size_idx] ** 2


def ellipse_bank(*, radius_um: float, elongation: float, um_per_px: float, rng: np.random.Generator,
                 chromatin: float = 0.0, scales: np.ndarray = SIZE_SCALES,
                 n_orientations: int = N_ORIENTATIONS) -> StampBank:
    """Soft-edged ellipses (area-equivalent radius ``radius_um * scale``) at ``n_orientations`` angles.

    ``chromatin`` > 0 speckles the interior (nuclear texture).
    """
    radii_px = radius_um * scales / um_per_px
    major = radii_px * np.sqrt(elongation)
    minor = radii_px / np.sqrt(elongation)
    half = int(np.ceil(major.max() + 2))
    grid = np.arange(-half, half + 1, dtype=np.float32)
    dy, dx = np.meshgrid(grid, grid, indexing="ij")
    out = np.empty((len(scales), n_orientations, 2 * half + 1, 2 * half + 1), dtype=np.float32)
    for i, (a, b) in enumerate(zip(major, minor)):
        for j in range(n_orientations):
            theta = np.pi * j / n_orientations
            u = dx * np.cos(theta) + dy * np.sin(theta)
            v = -dx * np.sin(theta) + dy * np.cos(theta)
            rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            stamp = np.clip((1.0 - rho) * b + 0.5, 0.0, 1.0)  # ~1 px soft edge
            if chromatin > 0:
                stamp *= 1.0 - chromatin + chromatin * rng.random(stamp.shape, dtype=np.float32)
            out[i, j] = stamp
    return StampBank(stamps=out, radius_um=(radius_um * scales).astype(np.float32))


def smooth_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator, *,
                 mode: str = "reflect") -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean and unit variance (float32)."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma, mode=mode)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def fibre_texture(*, angle: float, um_per_px: float, rng: np.random.Generator,
                  period: int = TEXTURE_PERIOD, warp_um: float = 8.0) -> np.ndarray:
    """Periodic (period x period) texture in [0, 1] of wavy fibres (~3 µm wide, ~40 µm long) along ``angle``.

    Anisotropic Gaussian-filtered noise, domain-warped by a smooth periodic field (``warp_um``) so the fibres bend.
    """
    from scipy.ndimage import map_coordinates

    freq = np.fft.fftfreq(period).astype(np.float32) / um_per_px  # cycles per µm
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    across_um = max(2.5, 2.0 * um_per_px)  # no finer than the pixels can show
    spectrum = np.exp(-0.5 * (along * 40.0) ** 2) * np.exp(-0.5 * (across * across_um) ** 2)
    noise = np.fft.fft2(rng.standard_normal((period, period)))
    field = np.real(np.fft.ifft2(noise * spectrum)).astype(np.float32)
    warp = [smooth_noise((period, period), 30.0 / um_per_px, rng, mode="wrap") * (warp_um / um_per_px)
            for _ in range(2)]
    yy, xx = np.mgrid[0:period, 0:period].astype(np.float32)
    field = map_coordinates(field, [yy + warp[0], xx + warp[1]], order=1, mode="grid-wrap")
    field = (field - field.mean()) / (field.std() + 1e-8)
    return (1.0 / (1.0 + np.exp(-2.0 * field))).astype(np.float32)


def grain_texture(*, rng: np.random.Generator, period: int = TEXTURE_PERIOD) -> np.ndarray:
    """Periodic fine grain (zero mean, unit variance, ~2 px correlation)."""
    return smooth_noise((period, period), 1.0, rng, mode="wrap")


def periodic_take(texture: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``texture`` sampled at the outer product of pixel ``rows`` and ``cols`` (wrapping)."""
    p = texture.shape[0]
    return texture[np.ix_(rows % p, cols % p)]


def stamp_into(out: np.ndarray, bank: StampBank, *, xs: np.ndarray, ys: np.ndarray, size_idx: np.ndarray,
               orient_idx: np.ndarray, weight: np.ndarray | None, x0: int, y0: int) -> None:
    """Add the stamps centred at pixel (``xs``, ``ys``) into ``out`` (whose top-left pixel is (x0, y0))."""
    if len(xs) == 0:
        return
    h, w = out.shape
    half = bank.half
    offs = np.arange(-half, half + 1, dtype=np.int64)
    rows = (ys.astype(np.int64) - y0)[:, None, None] + offs[None, :, None]
    cols = (xs.astype(np.int64) - x0)[:, None, None] + offs[None, None, :]
    vals = bank.stamps[size_idx, orient_idx]
    if weight is not None:
        vals = vals * weight[:, None, None]
    keep = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w) & (vals > 0)
    flat = np.broadcast_to(rows * w, keep.shape)[keep] + np.broadcast_to(cols, keep.shape)[keep]
    out += np.bincount(flat, weights=vals[keep], minlength=h * w).reshape(h, w).astype(np.float32)


def stain_to_rgb(*, haem: np.ndarray, eosin: np.ndarray, tissue: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """uint8 RGB (h, w, 3) from haematoxylin/eosin optical densities, tissue opacity and grain."""
    od_tissue = tissue * (1.0 + 0.06 * grain)
    h_od = haem * od_tissue
    e_od = eosin * od_tissue
    od = (h_od[..., None] * HAEMATOXYLIN_OD + e_od[..., None] * EOSIN_OD
          + (GLASS_OD + 0.01 * grain)[..., None])
    rgb = 255.0 * np.exp(-od)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def dark_fraction(rgb: np.ndarray, *, threshold: int = 150) -> float:
    """Fraction of haematoxylin-dark pixels (red channel below ``threshold``: nuclei; eosin barely absorbs red)."""
    return float((np.asarray(rgb)[..., 0] < threshold).mean())


def isotropic_texture(*, um_per_px: float, rng: np.random.Generator, period: int = TEXTURE_PERIOD,
                      grain_um: float = 2.5) -> np.ndarray:
    """Periodic texture in [0, 1] with the marginal distribution of ``fibre_texture`` but no direction (synth v3:
    the matrix of non-stroma classes, so fibre strength is equal and only the fibres' shape tells stroma apart)."""
    field = smooth_noise((period, period), grain_um / um_per_px, rng, mode="wrap")
    return (1.0 / (1.0 + np.exp(-2.0 * field))).astype(np.float32)
