"""Spot-level ground truth of a synthetic slide and the gene-expression model driven by it.

Per spot (a 55 µm disc): the tissue class at its centre, whether it lies on tissue, the realised nuclear area
fraction (area of the nuclei whose centres fall in the disc / disc area), the nuclear density and the hole (fat /
lumen) area fraction (union of the holes, on a 2 µm grid). Expression rate of gene g at spot s::

    rate[s, g] = base[g] * factor[g] ** (class[s] == programme_class[g])
                         * exp(beta[g] * (naf[s] - NAF_REF) / NAF_SCALE) * exp(gamma[g] * hole_fraction[s])
    counts[s, g] ~ NegativeBinomial(mean = size_factor[s] * rate[s, g], dispersion = DISPERSION)

Background (glass) spots get the mean tissue profile at ``BACKGROUND_LIBRARY`` of the library size (ambient RNA).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stalign.lab.synth_render import SlideLayout, hole_radii
from stofm.util.errors import InputError

SPOT_DIAMETER_UM = 55.0
PITCH_UM = 100.0
NAF_REF, NAF_SCALE = 0.20, 0.15
DISPERSION = 0.05
LIBRARY_MEDIAN, LIBRARY_LOG_SD = 8000.0, 0.35
BACKGROUND_LIBRARY = 0.03
PROGRAMME_GENES_PER_CLASS = 8
N_DENSITY_GENES = 8
N_HOLE_GENES = 4


def hex_grid(n_spots: int, *, margin_um: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Visium-like hex grid (``PITCH_UM`` apart, odd rows shifted by half a pitch), roughly square.

    Returns spot centres (n, 2) as (x, y) µm, array rows and array columns.
    """
    n_cols = int(np.ceil(np.sqrt(n_spots * np.sqrt(3) / 2)))
    idx = np.arange(n_spots)
    row, col = np.divmod(idx, n_cols)
    x = margin_um + col * PITCH_UM + (row % 2) * PITCH_UM / 2
    y = margin_um + row * PITCH_UM * np.sqrt(3) / 2
    return np.column_stack([x, y]), row, col


def spot_truth(layout: SlideLayout, centres_um: np.ndarray) -> dict[str, np.ndarray]:
    """Ground-truth image variables at each spot, measured on the drawn nuclei and holes."""
    from scipy.spatial import cKDTree

    radius = SPOT_DIAMETER_UM / 2
    disc = np.pi * radius**2
    n = len(centres_um)
    r, c = layout.cell_of(centres_um[:, 0], centres_um[:, 1])
    tissue = layout.tissue[r, c]
    tree = cKDTree(centres_um)
    nuc = layout.nuclei
    d, spot = tree.query(np.column_stack([nuc.x_um, nuc.y_um]), distance_upper_bound=radius)
    inside = np.isfinite(d)
    areas = np.zeros(len(nuc), np.float64)
    for k, bank in enumerate(layout.nucleus_banks):
        sel = nuc.cls == k
        areas[sel] = bank.area_um2(nuc.size_idx[sel])
    naf = np.bincount(spot[inside], weights=areas[inside], minlength=n) / disc
    count = np.bincount(spot[inside], minlength=n)
    hole_fraction = np.zeros(n)
    if len(layout.holes):
        hole_fraction = covered_fraction(centres_um, radius, np.column_stack([layout.holes.x_um, layout.holes.y_um]),
                                         hole_radii(layout.holes, layout.hole_banks))
    return {"tissue_class_idx": layout.class_map[r, c].astype(np.int64), "in_tissue": tissue > 0.5,
            "tissue_opacity": tissue.astype(np.float32), "nuclear_area_fraction": naf.astype(np.float32),
            "nuclei_per_mm2": (count / disc * 1e6).astype(np.float32),
            "hole_fraction": hole_fraction.astype(np.float32),
            "density_factor": layout.density[r, c].astype(np.float32)}


def covered_fraction(centres: np.ndarray, radius: float, disc_xy: np.ndarray, disc_r: np.ndarray, *,
                     step_um: float = 2.0, chunk: int = 512) -> np.ndarray:
    """Fraction of each spot disc (``radius``) covered by the union of the discs (``disc_xy``, ``disc_r``).

    Measured on a ``step_um`` grid of points inside the spot; only spot/disc pairs that can touch are checked.
    """
    from scipy.spatial import cKDTree

    g = np.arange(-radius, radius + 1e-9, step_um)
    gx, gy = np.meshgrid(g, g)
    inside = gx**2 + gy**2 <= radius**2
    pts = np.column_stack([gx[inside], gy[inside]]).astype(np.float32)  # (P, 2) offsets
    tree = cKDTree(disc_xy)
    out = np.zeros(len(centres))
    for lo in range(0, len(centres), chunk):
        pairs = tree.query_ball_point(centres[lo:lo + chunk], r=radius + float(disc_r.max()))
        counts = np.array([len(p) for p in pairs])
        has = np.flatnonzero(counts)
        if not len(has):
            continue
        s_idx = np.repeat(np.arange(lo, lo + len(pairs)), counts)
        h_idx = np.concatenate([np.asarray(pairs[i], dtype=np.int64) for i in has])
        rel = (centres[s_idx, None, :] - disc_xy[h_idx, None, :]).astype(np.float32) + pts[None]  # (pairs, P, 2)
        hit = (rel**2).sum(-1) <= (disc_r[h_idx, None] ** 2).astype(np.float32)
        starts = np.concatenate([[0], np.cumsum(counts[has])[:-1]])
        out[lo + has] = np.maximum.reduceat(hit, starts, axis=0).mean(axis=1)
    return out


@dataclass(frozen=True)
class GenePanel:
    """The known gene programmes: one row per gene."""

    names: list[str]
    programme: list[str]  # class name, "density", "holes" or "housekeeping"
    programme_class: np.ndarray  # class index, -1 for none
    base: np.ndarray
    factor: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray


def make_panel(*, n_genes: int, class_names: list[str], factor: float, seed: int) -> GenePanel:
    """Class programmes, nuclear-density genes, hole genes, then housekeeping genes up to ``n_genes``."""
    n_signal = len(class_names) * PROGRAMME_GENES_PER_CLASS + N_DENSITY_GENES + N_HOLE_GENES
    if n_genes < n_signal + 1:
        raise InputError(f"n_genes={n_genes} is too small: {len(class_names)} classes need at least {n_signal + 1}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    names, programme, pclass = [], [], []
    for k, cname in enumerate(class_names):
        for i in range(PROGRAMME_GENES_PER_CLASS):
            names.append(f"{cname}_{i + 1:02d}")
            programme.append(cname)
            pclass.append(k)
    for i in range(N_DENSITY_GENES):
        names.append(f"density_{i + 1:02d}")
        programme.append("density")
        pclass.append(-1)
    for i in range(N_HOLE_GENES):
        names.append(f"holes_{i + 1:02d}")
        programme.append("holes")
        pclass.append(-1)
    n_hk = n_genes - len(names)
    names += [f"hk_{i + 1:04d}" for i in range(n_hk)]
    programme += ["housekeeping"] * n_hk
    pclass += [-1] * n_hk
    prog = np.array(programme)
    base = np.zeros(n_genes)
    base[np.array(pclass) >= 0] = 1.5e-3
    base[prog == "density"] = 3e-3
    base[prog == "holes"] = 2e-3
    hk = rng.lognormal(0.0, 1.0, n_hk)
    base[prog == "housekeeping"] = hk / hk.sum() * max(1.0 - base.sum(), 0.2)
    beta = np.zeros(n_genes)
    beta[prog == "density"] = np.r_[np.linspace(0.5, 0.9, N_DENSITY_GENES - 2), [-0.5, -0.4]]
    gamma = np.zeros(n_genes)
    gamma[prog == "holes"] = np.linspace(2.5, 3.5, N_HOLE_GENES)
    fac = np.where(np.array(pclass) >= 0, factor, 1.0)
    return GenePanel(names=names, programme=programme, programme_class=np.array(pclass), base=base,
                     factor=fac, beta=beta, gamma=gamma)


#: truth.json's record of each gene: key -> panel column (synth v2's ``ContextPanel`` adds driver, variable, coef)
GENE_RECORD = {"name": "names", "programme": "programme", "driver": "driver", "variable": "variable", "base": "base",
               "factor": "factor", "beta": "beta", "gamma": "gamma", "coef": "coef"}


def gene_records(panel: GenePanel) -> list[dict]:
    """One ``GENE_RECORD`` per gene of ``panel`` (truth.json's ``genes``; numbers as floats)."""
    cols = {k: getattr(panel, a) for k, a in GENE_RECORD.items() if hasattr(panel, a)}
    return [{k: float(v[i]) if isinstance(v, np.ndarray) else v[i] for k, v in cols.items()}
            for i in range(len(panel.names))]


def expression_rates(panel: GenePanel, truth: dict[str, np.ndarray]) -> np.ndarray:
    """Noise-free expression rate per spot and gene (counts per unit library size) for tissue spots."""
    cls = truth["tissue_class_idx"]
    z = np.clip((truth["nuclear_area_fraction"].astype(np.float64) - NAF_REF) / NAF_SCALE, -4, 6)
    in_prog = panel.programme_class[None, :] == cls[:, None]
    log_rate = (np.log(np.maximum(panel.base, 1e-12))[None, :] + in_prog * np.log(panel.factor)[None, :]
                + panel.beta[None, :] * z[:, None] + panel.gamma[None, :] * truth["hole_fraction"][:, None])
    return np.exp(log_rate)


def counts_from_rates(rates: np.ndarray, on: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Negative-binomial counts around ``size_factor * rates``; glass spots (``~on``) get the mean tissue profile
    at ``BACKGROUND_LIBRARY`` of the library size."""
    if on.any():
        rates[~on] = rates[on].mean(axis=0)
    size = LIBRARY_MEDIAN * rng.lognormal(0.0, LIBRARY_LOG_SD, len(rates))
    size[~on] *= BACKGROUND_LIBRARY
    mean = size[:, None] * rates
    shape = 1.0 / DISPERSION
    counts = rng.poisson(rng.gamma(shape, mean / shape))
    return counts.astype(np.int32), size
