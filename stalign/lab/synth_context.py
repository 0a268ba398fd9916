"""Neighbourhood ground truth and the gene programmes of synth v2 (spot-driven + context-driven genes).

Per spot, beyond the v1 variables (``synth_expression.spot_truth``): the domain at its centre, the tissue-class
composition of the ``CONTEXT_UM``-wide disc around it, the distance to the nearest domain boundary, a smooth gradient
across the slide, the ligand activity of the spot and the mean ligand activity of its ring-1 neighbours (100 µm),
and the capillaries counted in the spot disc and in the context disc. Expression rate of gene g at spot s::

    log rate[s, g] = log base[g] + log factor[g] * [class[s] == programme_class[g]]       (spot: class)
                     + beta[g] * z_naf[s] + gamma[g] * hole_fraction[s]                     (spot: density, holes)
                     + coef[g] * driver[g][s]                                               (ligand; context genes)

with ``driver`` one of ``ligand_activity`` (spot), ``comp300_<class>``, ``boundary_proximity`` =
exp(-boundary_distance_um / BOUNDARY_SCALE_UM), ``gradient``, ``ligand_score`` and ``domain == d`` (context).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stalign.lab.synth_domains import ContextMaps, Domain
from stalign.lab.synth_expression import (
    NAF_REF,
    NAF_SCALE,
    PITCH_UM,
    PROGRAMME_GENES_PER_CLASS,
    SPOT_DIAMETER_UM,
    GenePanel,
    expression_rates,
    make_panel,
)
from stalign.lab.synth_render import SlideLayout
from stofm.util.errors import InputError

CONTEXT_UM = 300.0  # diameter of the disc whose class composition drives the niche genes
BOUNDARY_SCALE_UM = 100.0
LIGAND_CAP = 2.0
LIGAND_CLASS = "immune"  # the ligand-producing class (the last class when the slide has no immune class)
CONTEXT_BASE = 2e-3
NICHE_COEF = (2.5, 3.0)  # per class: coefficients of its two niche genes on comp300_<class>
BOUNDARY_COEF = (2.0, 2.3, 2.6, 2.9)
GRADIENT_COEF = (2.0, 2.5, -2.0, -2.5)
LIGAND_COEF = (1.2, 1.5)
RECEPTOR_COEF = (1.8, 2.2)
DOMAIN_FACTOR = 3.0  # two marker genes per domain
SPOT, CONTEXT, NONE = "spot", "context", "none"


def ligand_class(class_names: list[str]) -> int:
    return class_names.index(LIGAND_CLASS) if LIGAND_CLASS in class_names else len(class_names) - 1


def context_truth(layout: SlideLayout, maps: ContextMaps, centres_um: np.ndarray,
                  base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-spot context variables (see the module docstring) measured on the layout's coarse maps."""
    from scipy.ndimage import distance_transform_edt
    from scipy.signal import fftconvolve
    from scipy.spatial import cKDTree

    r, c = layout.cell_of(centres_um[:, 0], centres_um[:, 1])
    on_map = layout.tissue > 0.5
    on = base["in_tissue"]
    out: dict[str, np.ndarray] = {"domain_idx": np.where(on, maps.domain[r, c], -1).astype(np.int64)}

    rad = CONTEXT_UM / 2 / layout.coarse_um
    k = np.arange(-int(np.ceil(rad)), int(np.ceil(rad)) + 1)
    disc = (k[:, None] ** 2 + k[None, :] ** 2 <= rad**2).astype(np.float32)
    area = fftconvolve(on_map.astype(np.float32), disc, mode="same")[r, c]
    for i, cls in enumerate(layout.classes):
        part = fftconvolve((on_map & (layout.class_map == i)).astype(np.float32), disc, mode="same")[r, c]
        out[f"comp300_{cls.name}"] = np.where(area > 0.5, np.clip(part / np.maximum(area, 1e-6), 0, 1), 0.0
                                              ).astype(np.float32)

    dom = np.where(on_map, maps.domain, -1)
    edge = np.zeros_like(on_map)
    across = (dom[:, 1:] != dom[:, :-1]) & (dom[:, 1:] >= 0) & (dom[:, :-1] >= 0)
    down = (dom[1:, :] != dom[:-1, :]) & (dom[1:, :] >= 0) & (dom[:-1, :] >= 0)
    edge[:, 1:] |= across
    edge[:, :-1] |= across
    edge[1:, :] |= down
    edge[:-1, :] |= down
    if edge.any():
        dist = distance_transform_edt(~edge)[r, c] * layout.coarse_um
    else:  # one domain only: no boundary on this slide
        dist = np.full(len(centres_um), float(np.hypot(*layout.tissue.shape) * layout.coarse_um))
    out["boundary_distance_um"] = dist.astype(np.float32)
    out["boundary_proximity"] = np.exp(-dist / BOUNDARY_SCALE_UM).astype(np.float32)
    out["gradient"] = maps.gradient[r, c].astype(np.float32)

    names = [cl.name for cl in layout.classes]
    z = np.clip((base["nuclear_area_fraction"].astype(np.float64) - NAF_REF) / NAF_SCALE, -4, 6)
    activity = np.where(on & (base["tissue_class_idx"] == ligand_class(names)),
                        np.minimum(np.exp(0.5 * z), LIGAND_CAP), 0.0)
    out["ligand_activity"] = activity.astype(np.float32)
    pairs = cKDTree(centres_um).query_pairs(1.1 * PITCH_UM, output_type="ndarray")
    i, j = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    n_nb = np.bincount(i, minlength=len(centres_um))
    score = np.bincount(i, weights=activity[j], minlength=len(centres_um)) / np.maximum(n_nb, 1)
    out["ligand_score"] = score.astype(np.float32)

    v = layout.vessels
    vxy = np.column_stack([v.x_um, v.y_um]) if v is not None and len(v) else np.zeros((0, 2))
    for key, radius in (("vessels_in_spot", SPOT_DIAMETER_UM / 2), ("vessels_in_context", CONTEXT_UM / 2)):
        if len(vxy):
            counts = cKDTree(vxy).query_ball_point(centres_um, r=radius, return_length=True)
        else:
            counts = np.zeros(len(centres_um))
        out[key] = np.asarray(counts, dtype=np.int64)
    return out


@dataclass(frozen=True)
class ContextPanel(GenePanel):
    """The v2 gene programmes: v1 columns plus the driver of each gene."""

    driver: list[str]  # "spot", "context" or "none" (housekeeping)
    variable: list[str]  # the per-spot variable that drives the gene ("" for housekeeping)
    coef: np.ndarray  # coefficient of log rate on the variable (ligand and context genes; 0 otherwise)
    programme_domain: np.ndarray  # domain index of a domain marker gene, -1 otherwise


def make_context_panel(*, n_genes: int, class_names: list[str], domains: tuple[Domain, ...], factor: float,
                       seed: int) -> ContextPanel:
    """v1's spot programmes (class, density, holes), ligand genes, the context programmes, then housekeeping."""
    rows: list[tuple[str, str, str, str, float, int]] = []  # name, programme, driver, variable, coef, domain
    for i, coef in enumerate(LIGAND_COEF):
        rows.append((f"ligand_{i + 1:02d}", "ligand", SPOT, "ligand_activity", coef, -1))
    for cname in class_names:
        for i, coef in enumerate(NICHE_COEF):
            rows.append((f"niche_{cname}_{i + 1:02d}", "composition", CONTEXT, f"comp300_{cname}", coef, -1))
    for i, coef in enumerate(BOUNDARY_COEF):
        rows.append((f"boundary_{i + 1:02d}", "boundary", CONTEXT, "boundary_proximity", coef, -1))
    for i, coef in enumerate(GRADIENT_COEF):
        rows.append((f"gradient_{i + 1:02d}", "gradient", CONTEXT, "gradient", coef, -1))
    for i, coef in enumerate(RECEPTOR_COEF):
        rows.append((f"receptor_{i + 1:02d}", "receptor", CONTEXT, "ligand_score", coef, -1))
    for d, dom in enumerate(domains):
        for i in range(2):
            rows.append((f"domain_{dom.name}_{i + 1:02d}", "domain", CONTEXT, f"domain=={dom.name}",
                         float(np.log(DOMAIN_FACTOR)), d))
    n_v1_signal = len(class_names) * PROGRAMME_GENES_PER_CLASS + 12
    if n_genes < n_v1_signal + len(rows) + 1:
        raise InputError(f"n_genes={n_genes} is too small: synth v2 with {len(class_names)} classes and "
                         f"{len(domains)} domains needs at least {n_v1_signal + len(rows) + 1}")
    v1 = make_panel(n_genes=n_genes - len(rows), class_names=class_names, factor=factor, seed=seed)
    n_sig = int(np.sum(np.array(v1.programme) != "housekeeping"))
    hk = slice(n_sig, None)
    names = v1.names[:n_sig] + [r[0] for r in rows] + v1.names[hk]
    programme = v1.programme[:n_sig] + [r[1] for r in rows] + v1.programme[hk]
    driver = [SPOT] * n_sig + [r[2] for r in rows] + [NONE] * (len(v1.names) - n_sig)
    variable = ([_spot_variable(p) for p in v1.programme[:n_sig]] + [r[3] for r in rows]
                + [""] * (len(v1.names) - n_sig))
    zeros = np.zeros(len(rows))
    base_ctx = np.full(len(rows), CONTEXT_BASE)
    hk_base = v1.base[hk] * (1.0 - CONTEXT_BASE * len(rows)) if len(rows) else v1.base[hk]
    return ContextPanel(
        names=names, programme=programme,
        programme_class=np.r_[v1.programme_class[:n_sig], np.full(len(rows), -1), v1.programme_class[hk]],
        base=np.r_[v1.base[:n_sig], base_ctx, hk_base], factor=np.r_[v1.factor[:n_sig], np.ones(len(rows)),
                                                                      v1.factor[hk]],
        beta=np.r_[v1.beta[:n_sig], zeros, v1.beta[hk]], gamma=np.r_[v1.gamma[:n_sig], zeros, v1.gamma[hk]],
        driver=driver, variable=variable, coef=np.r_[np.zeros(n_sig), [r[4] for r in rows], np.zeros(
            len(v1.names) - n_sig)],
        programme_domain=np.r_[np.full(n_sig, -1), [r[5] for r in rows], np.full(len(v1.names) - n_sig, -1)])


def _spot_variable(programme: str) -> str:
    return {"density": "nuclear_area_fraction", "holes": "hole_fraction"}.get(programme, "tissue_class")


def driver_values(panel: ContextPanel, truth: dict[str, np.ndarray], domain_names: list[str]) -> np.ndarray:
    """(n_spots, n_genes) value of each ligand/context gene's driver variable (0 for the other genes)."""
    n = len(truth["in_tissue"])
    out = np.zeros((n, len(panel.names)))
    for g, (var, coef) in enumerate(zip(panel.variable, panel.coef)):
        if coef == 0:
            continue
        if var.startswith("domain=="):
            out[:, g] = truth["domain_idx"] == domain_names.index(var[len("domain=="):])
        else:
            out[:, g] = truth[var]
    return out


def context_rates(panel: ContextPanel, truth: dict[str, np.ndarray], domain_names: list[str]) -> np.ndarray:
    """Noise-free expression rates of the v2 panel (v1's spot terms times exp(coef * driver))."""
    return expression_rates(panel, truth) * np.exp(panel.coef[None, :] * driver_values(panel, truth, domain_names))
