"""Per-site and per-slide stain, illumination and scanner of synth v3 (docs/synth.md, "Synth v3").

A site (lab + scanner) draws its look once; each slide of the site draws a smaller deviation from it:

- **stain vectors**: the Ruifrok-Johnston haematoxylin and eosin optical-density vectors, each rotated by an angle
  (site: up to ``SITE_ANGLE_DEG``, slide: up to ``SLIDE_ANGLE_DEG`` more) about a random axis (Macenko et al. 2009
  estimate these vectors per slide because they differ between labs);
- **concentrations**: each stain's optical density scaled (site: U[1 - 0.2, 1 + 0.2], Tellez et al. 2019's
  "HED-strong" range; slide: U[1 - 0.05, 1 + 0.05], their "HED-light" range) plus a bias (same ranges x 0.1 OD);
- **illumination**: the white level (light through empty glass) per RGB channel, ``WHITE_RANGE`` of 255;
- **scanner**: Gaussian blur of level 0 (``BLUR_PX_RANGE``, focus) and JPEG quality (``JPEG_QUALITY_RANGE``).
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np

from stalign.lab.synth_texture import EOSIN_OD, GLASS_OD, HAEMATOXYLIN_OD

SITE_ANGLE_DEG, SLIDE_ANGLE_DEG = 10.0, 3.0
SITE_SCALE, SLIDE_SCALE = 0.20, 0.05  # Tellez 2019: HED-strong / HED-light (scale U[1 - s, 1 + s])
BIAS_OD = 0.1  # bias = U[-s, s] * BIAS_OD optical density per stain
WHITE_RANGE = (0.86, 1.0)  # per-channel white level (fraction of 255), drawn per site
WHITE_SLIDE_JITTER = 0.02
BLUR_PX_RANGE = (0.0, 1.2)  # level-0 Gaussian sigma (px), drawn per site; per slide x U[0.8, 1.2]
JPEG_QUALITY_RANGE = (70, 95)  # per site


@dataclass(frozen=True)
class Stain:
    """The look of one slide (or of one site, before its slides deviate)."""

    haematoxylin_od: tuple[float, float, float]  # unit OD vector
    eosin_od: tuple[float, float, float]
    h_scale: float
    e_scale: float
    h_bias: float
    e_bias: float
    white: tuple[float, float, float]  # per-channel white level, 0..255
    blur_px: float
    jpeg_quality: int

    def record(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def _rotate(v: np.ndarray, max_deg: float, rng: np.random.Generator) -> np.ndarray:
    """``v`` rotated by U[0, max_deg] degrees towards a random direction orthogonal to it; kept non-negative."""
    axis = rng.standard_normal(3)
    axis -= axis @ v * v
    axis /= np.linalg.norm(axis) + 1e-12
    ang = np.radians(rng.uniform(0.0, max_deg))
    out = np.clip(np.cos(ang) * v + np.sin(ang) * axis, 1e-3, None)
    return out / np.linalg.norm(out)


def _round(v) -> tuple[float, ...]:
    return tuple(round(float(x), 6) for x in v)


def site_stain(site: int, *, panel_seed: int = 0) -> Stain:
    """The look of site number ``site`` of a data set (``panel_seed``); every slide of the site shares it."""
    rng = np.random.default_rng(np.random.SeedSequence([panel_seed, site, 31]))
    h = _rotate(HAEMATOXYLIN_OD.astype(np.float64), SITE_ANGLE_DEG, rng)
    e = _rotate(EOSIN_OD.astype(np.float64), SITE_ANGLE_DEG, rng)
    hs, es = rng.uniform(1 - SITE_SCALE, 1 + SITE_SCALE, 2)
    hb, eb = rng.uniform(-SITE_SCALE, SITE_SCALE, 2) * BIAS_OD
    white = 255.0 * rng.uniform(*WHITE_RANGE, 3)
    return Stain(haematoxylin_od=_round(h), eosin_od=_round(e), h_scale=round(float(hs), 6),
                 e_scale=round(float(es), 6), h_bias=round(float(hb), 6), e_bias=round(float(eb), 6),
                 white=_round(white), blur_px=round(float(rng.uniform(*BLUR_PX_RANGE)), 6),
                 jpeg_quality=int(rng.integers(JPEG_QUALITY_RANGE[0], JPEG_QUALITY_RANGE[1] + 1)))


def slide_stain(site: Stain, rng: np.random.Generator) -> Stain:
    """One slide of ``site``: smaller rotations, HED-light scale and bias, a little white and blur jitter."""
    h = _rotate(np.array(site.haematoxylin_od), SLIDE_ANGLE_DEG, rng)
    e = _rotate(np.array(site.eosin_od), SLIDE_ANGLE_DEG, rng)
    hs, es = np.array([site.h_scale, site.e_scale]) * rng.uniform(1 - SLIDE_SCALE, 1 + SLIDE_SCALE, 2)
    hb, eb = np.array([site.h_bias, site.e_bias]) + rng.uniform(-SLIDE_SCALE, SLIDE_SCALE, 2) * BIAS_OD
    white = np.clip(np.array(site.white) * rng.uniform(1 - WHITE_SLIDE_JITTER, 1 + WHITE_SLIDE_JITTER, 3), 0, 255)
    return Stain(haematoxylin_od=_round(h), eosin_od=_round(e), h_scale=round(float(hs), 6),
                 e_scale=round(float(es), 6), h_bias=round(float(hb), 6), e_bias=round(float(eb), 6),
                 white=_round(white), blur_px=round(float(site.blur_px * rng.uniform(0.8, 1.2)), 6),
                 jpeg_quality=site.jpeg_quality)


def stained_rgb(*, haem: np.ndarray, eosin: np.ndarray, tissue: np.ndarray, grain: np.ndarray,
                stain: Stain) -> np.ndarray:
    """uint8 RGB (h, w, 3) of a block through ``stain`` (Beer-Lambert), then the scanner's blur and JPEG.

    Blur and JPEG act on each block (256 rows); the JPEG 8x8 grid is aligned with the blocks, the blur sees the
    block's edge replicated (sigma <= 1.5 px, so seams are below a grey level).
    """
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    od_tissue = tissue * (1.0 + 0.06 * grain)
    h_od = np.maximum(haem * stain.h_scale + stain.h_bias * (haem > 0), 0.0) * od_tissue
    e_od = np.maximum(eosin * stain.e_scale + stain.e_bias * (eosin > 0), 0.0) * od_tissue
    od = (h_od[..., None] * np.asarray(stain.haematoxylin_od, np.float32)
          + e_od[..., None] * np.asarray(stain.eosin_od, np.float32) + (GLASS_OD + 0.01 * grain)[..., None])
    rgb = np.asarray(stain.white, np.float32) * np.exp(-od)
    if stain.blur_px > 0:
        rgb = gaussian_filter(rgb, sigma=(stain.blur_px, stain.blur_px, 0), mode="nearest")
    rgb = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=stain.jpeg_quality, subsampling=0)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


@dataclass(frozen=True)
class Look:
    """What synth v3 renders differently: the slide's ``stain`` and each class's fibre anisotropy (1: aligned
    stroma fibres, 0: isotropic matrix of the same strength)."""

    stain: Stain
    aniso: tuple[float, ...]
