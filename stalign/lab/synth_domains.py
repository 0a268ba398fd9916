"""Spatial domains of a synthetic slide (synth v2): layered or patchy regions drawn as tissue-class mixtures.

A domain is a mixture of the tissue classes the renderer already draws (e.g. ``D1_tumour``: mostly tumour with some
stroma and immune cells). The slide is cut into domains (``layers``: warped bands across the slide, like cortical
layers; ``islands``: blobs, like tumour nests in stroma); inside a domain the tissue is a mosaic of small class
patches (~``patch_um`` across) whose classes are drawn from the domain's mixture. So the domain shows in the image
as the class composition of a niche-sized window, while one 55 µm spot (one patch) says little about it.
A smooth gradient across the slide shows as the density of capillaries (red blood cells, ~6 µm discs): a few per
niche crop, rarely one in a spot.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stalign.lab.synth_render import (
    SlideLayout,
    _scatter,
    outside_holes,
    populate_layout,
    tissue_outline,
)
from stalign.lab.synth_texture import TissueClass, ellipse_bank, smooth_noise
from stofm.util.errors import InputError

DOMAIN_LAYOUTS = ("layers", "islands")
DOMINANT_WEIGHT = 0.75  # share of a domain's dominant class in its mixture
PATCH_UM = 120.0  # size of the class patches inside a domain
VESSELS_PER_MM2 = 70.0  # capillary density at gradient 0.5
VESSEL_GRADIENT = 1.2  # log density = log VESSELS_PER_MM2 + VESSEL_GRADIENT * (2 * gradient - 1)
VESSEL_RADIUS_UM = 6.0


@dataclass(frozen=True)
class Domain:
    """One spatial domain: its label and the tissue-class mixture it is drawn with."""

    name: str
    dominant: str
    mixture: tuple[float, ...]  # probability of each tissue class (in the slide's class order)


def make_domains(class_names: list[str], n_domains: int, *, seed: int) -> tuple[Domain, ...]:
    """``n_domains`` domains; domain ``d`` is dominated by class ``d mod n_classes`` (``DOMINANT_WEIGHT``), the rest
    of its mixture is a Dirichlet(1) draw over the other classes. Depends on ``seed`` only (the panel seed), so
    slides of one data set share their domains."""
    n_cls = len(class_names)
    if n_cls < 2:
        raise InputError("synth v2 needs n_classes >= 2 (its domains are drawn as tissue-class mixtures)")
    if not 2 <= n_domains <= 8:
        raise InputError(f"n_domains must lie in [2, 8], got {n_domains}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    out = []
    for d in range(n_domains):
        k = d % n_cls
        rest = rng.dirichlet(np.ones(n_cls - 1)) * (1.0 - DOMINANT_WEIGHT)
        mix = np.insert(rest, k, DOMINANT_WEIGHT)
        out.append(Domain(name=f"D{d + 1}_{class_names[k]}", dominant=class_names[k],
                          mixture=tuple(round(float(m), 6) for m in mix / mix.sum())))
    return tuple(out)


@dataclass(frozen=True)
class ContextMaps:
    """Coarse maps of the context variables (same grid as the layout's class map)."""

    domain: np.ndarray  # (Hc, Wc) int16 domain index
    gradient: np.ndarray  # (Hc, Wc) float32 in [0, 1]
    gradient_angle_deg: float
    layer_angle_deg: float | None  # direction across the layers (None for islands)


def build_context_layout(*, width_um: float, height_um: float, array_box: tuple[float, float, float, float],
                         classes: tuple[TissueClass, ...], domains: tuple[Domain, ...], um_per_px: float,
                         rng: np.random.Generator, domain_layout: str = "layers", patch_um: float = PATCH_UM,
                         coarse_um: float = 8.0, populate=populate_layout) -> tuple[SlideLayout, ContextMaps]:
    """Tissue outline, domains, class patches, gradient, then nuclei/holes (``populate``: ``populate_layout``, or
    synth v3's ``synth_morph.populate_morph_layout``) and capillaries."""
    if domain_layout not in DOMAIN_LAYOUTS:
        raise InputError(f"domain_layout must be one of {DOMAIN_LAYOUTS}, got {domain_layout!r}")
    grid = tissue_outline(width_um=width_um, height_um=height_um, array_box=array_box, rng=rng,
                          coarse_um=coarse_um)
    on = grid.tissue > 0.5
    if domain_layout == "layers":
        domain, layer_angle = _layers(grid.gx, grid.gy, on, len(domains), coarse_um, rng)
    else:
        domain, layer_angle = _islands(grid.gx.shape, len(domains), coarse_um, rng), None
    class_map = _patch_classes(grid.gx, grid.gy, domain, domains, array_box, patch_um, coarse_um, rng)
    angle = float(rng.uniform(0.0, 2 * np.pi))
    gradient = _ramp(grid.gx, grid.gy, array_box, angle)
    layout = populate(grid, class_map, classes=classes, um_per_px=um_per_px, rng=rng)
    layout.vessel_bank = ellipse_bank(radius_um=VESSEL_RADIUS_UM, elongation=1.3, um_per_px=um_per_px, rng=rng,
                                      n_orientations=4)
    lam = vessel_density(gradient) * (coarse_um / 1000.0) ** 2 * on
    vessels = _scatter(rng, lam, np.zeros_like(class_map), coarse_um, n_sizes=len(layout.vessel_bank.radius_um),
                       n_orient=4, darkness=np.ones(1, np.float32))
    layout.vessels = outside_holes(layout, vessels)
    maps = ContextMaps(domain=domain, gradient=gradient, gradient_angle_deg=round(float(np.degrees(angle)), 3),
                       layer_angle_deg=layer_angle)
    return layout, maps


def vessel_density(gradient: np.ndarray) -> np.ndarray:
    """Capillaries per mm² at a gradient value (log-linear, ~x3.3 from one end of the slide to the other)."""
    return (VESSELS_PER_MM2 * np.exp(VESSEL_GRADIENT * (2.0 * np.asarray(gradient) - 1.0))).astype(np.float32)


def _layers(gx: np.ndarray, gy: np.ndarray, on: np.ndarray, n: int, coarse_um: float,
            rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Bands across a random direction with wavy borders; band widths from a Dirichlet(4) draw."""
    theta = float(rng.uniform(0.0, np.pi))
    u = gx * np.cos(theta) + gy * np.sin(theta)
    span = float(np.ptp(u[on])) if on.any() else float(np.ptp(u))
    u = u + 0.06 * span * smooth_noise(gx.shape, 250.0 / coarse_um, rng)
    shares = rng.dirichlet(np.full(n, 4.0))
    cuts = np.quantile(u[on] if on.any() else u, np.cumsum(shares)[:-1])
    return np.searchsorted(cuts, u).astype(np.int16), round(float(np.degrees(theta)), 3)


def _islands(shape: tuple[int, int], n: int, coarse_um: float, rng: np.random.Generator) -> np.ndarray:
    """Patchy regions: the arg-max of ``n`` smooth random fields (blobs ~0.5 mm across)."""
    fields = np.stack([smooth_noise(shape, 150.0 / coarse_um, rng) for _ in range(n)])
    return fields.argmax(axis=0).astype(np.int16)


def _patch_classes(gx: np.ndarray, gy: np.ndarray, domain: np.ndarray, domains: tuple[Domain, ...],
                   array_box: tuple[float, float, float, float], patch_um: float, coarse_um: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Class map: warped Voronoi patches ~``patch_um`` across, each of a class drawn from its domain's mixture."""
    from scipy.spatial import cKDTree

    x0, y0, x1, y1 = array_box
    pad = 2 * patch_um
    n = max(len(domains), round((x1 - x0 + 2 * pad) * (y1 - y0 + 2 * pad) / patch_um**2))
    seeds = np.column_stack([rng.uniform(x0 - pad, x1 + pad, n), rng.uniform(y0 - pad, y1 + pad, n)])
    hc, wc = domain.shape
    r = np.clip((seeds[:, 1] / coarse_um).astype(np.int64), 0, hc - 1)
    c = np.clip((seeds[:, 0] / coarse_um).astype(np.int64), 0, wc - 1)
    cdf = np.cumsum(np.array([d.mixture for d in domains]), axis=1)
    cdf[:, -1] = 1.0
    seed_dom = domain[r, c]
    seed_cls = (rng.random(n)[:, None] > cdf[seed_dom]).sum(axis=1)
    warp = 0.3 * patch_um
    wx = gx + warp * smooth_noise(gx.shape, 30.0 / coarse_um, rng)
    wy = gy + warp * smooth_noise(gx.shape, 30.0 / coarse_um, rng)
    _, region = cKDTree(seeds).query(np.column_stack([wx.ravel(), wy.ravel()]))
    return seed_cls[region].reshape(hc, wc).astype(np.int16)


def _ramp(gx: np.ndarray, gy: np.ndarray, array_box: tuple[float, float, float, float], angle: float) -> np.ndarray:
    """A linear gradient along ``angle``, 0 at one corner of the spot array and 1 at the opposite one."""
    x0, y0, x1, y1 = array_box
    proj = np.array([x * np.cos(angle) + y * np.sin(angle) for x in (x0, x1) for y in (y0, y1)])
    g = (gx * np.cos(angle) + gy * np.sin(angle) - proj.min()) / (proj.max() - proj.min())
    return np.clip(g, 0.0, 1.0).astype(np.float32)

