"""The synth v2 world for one slide: domains and context layout, per-spot truth, the v2 panel and its counts.

``make_synthetic_slide(version=2)`` calls ``build_world`` and writes what it returns (the extra ``obs``/``var``
columns, the ``uns`` and ``truth.json`` entries) next to the v1 ones.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from stalign.lab.synth_context import (
    BOUNDARY_SCALE_UM,
    CONTEXT_UM,
    LIGAND_CAP,
    ContextPanel,
    context_rates,
    context_truth,
    ligand_class,
    make_context_panel,
)
from stalign.lab.synth_domains import (
    PATCH_UM,
    VESSEL_GRADIENT,
    VESSELS_PER_MM2,
    Domain,
    build_context_layout,
    make_domains,
)
from stalign.lab.synth_expression import counts_from_rates, spot_truth
from stalign.lab.synth_render import SlideLayout
from stalign.lab.synth_texture import TissueClass

BACKGROUND = "background"
FORMULA_V2 = ("log rate = log base + log(factor) * [class == programme_class] + beta * (naf - naf_ref) / naf_scale "
              "+ gamma * hole_fraction + coef * driver (driver: ligand_activity, comp300_<class>, "
              "boundary_proximity = exp(-boundary_distance_um / boundary_scale_um), gradient, ligand_score, "
              "[domain == d]); counts ~ NB(size_factor * rate, dispersion)")
# per-spot truth columns of v2 written to obs (beyond v1's) and listed in truth.json["spots"]
CONTEXT_COLUMNS = ("boundary_distance_um", "boundary_proximity", "gradient", "ligand_activity", "ligand_score",
                   "vessels_in_spot", "vessels_in_context")


@dataclass
class World:
    layout: SlideLayout
    truth_obs: dict[str, np.ndarray]
    counts: np.ndarray
    size: np.ndarray
    panel: ContextPanel
    domains: tuple[Domain, ...]
    info: dict  # slide-level context truth (truth.json["context"])


def build_world(*, width_um: float, height_um: float, array_box: tuple[float, float, float, float],
                centres_um: np.ndarray, classes: tuple[TissueClass, ...], um_per_px: float, n_genes: int,
                programme_factor: float, panel_seed: int, n_domains: int, domain_layout: str,
                layout_rng: np.random.Generator, expr_rng: np.random.Generator, populate=None) -> World:
    """Layout with domains, per-spot v1 + context truth, the v2 panel and sampled counts (``populate``: how the
    nuclei are drawn, ``synth_domains.build_context_layout``'s default or synth v3's morphology)."""
    names = [c.name for c in classes]
    domains = make_domains(names, n_domains, seed=panel_seed)
    panel = make_context_panel(n_genes=n_genes, class_names=names, domains=domains, factor=programme_factor,
                               seed=panel_seed)
    layout, maps = build_context_layout(width_um=width_um, height_um=height_um, array_box=array_box,
                                        classes=classes, domains=domains, um_per_px=um_per_px, rng=layout_rng,
                                        domain_layout=domain_layout,
                                        **({"populate": populate} if populate is not None else {}))
    truth_obs = spot_truth(layout, centres_um)
    truth_obs.update(context_truth(layout, maps, centres_um, truth_obs))
    rates = context_rates(panel, truth_obs, [d.name for d in domains])
    counts, size = counts_from_rates(rates, truth_obs["in_tissue"], expr_rng)
    info = {"domain_layout": domain_layout, "domains": [asdict(d) for d in domains],
            "layer_angle_deg": maps.layer_angle_deg, "gradient_angle_deg": maps.gradient_angle_deg,
            "gradient": "linear ramp along gradient_angle_deg, 0 at one corner of the spot array, 1 at the other",
            "context_um": CONTEXT_UM, "boundary_scale_um": BOUNDARY_SCALE_UM, "patch_um": PATCH_UM,
            "ligand_class": names[ligand_class(names)], "ligand_cap": LIGAND_CAP,
            "ligand_activity": "[class == ligand_class] * min(exp(0.5 * z_naf), ligand_cap)",
            "ligand_score": "mean ligand_activity of the spots within 1.1 pitch (ring-1 neighbours, self excluded)",
            "vessels_per_mm2": VESSELS_PER_MM2, "vessel_gradient": VESSEL_GRADIENT,
            "vessel_density": "vessels_per_mm2 * exp(vessel_gradient * (2 * gradient - 1))",
            "n_vessels": int(len(layout.vessels)) if layout.vessels is not None else 0,
            "domain_spot_counts": {d.name: int((truth_obs["domain_idx"] == i).sum()) for i, d in enumerate(domains)}}
    return World(layout=layout, truth_obs=truth_obs, counts=counts, size=size, panel=panel, domains=domains,
                 info=json.loads(json.dumps(info)))  # as truth.json will hold it (lists, not tuples)


def domain_labels(world: World) -> np.ndarray:
    names = np.array([d.name for d in world.domains] + [BACKGROUND], dtype=object)
    return names[world.truth_obs["domain_idx"]]  # -1 -> background


def extra_obs(world: World) -> dict:
    """v2's obs columns: domain label and index, class composition, the context drivers, capillary counts."""
    import pandas as pd

    t = world.truth_obs
    cols: dict = {"domain": pd.Categorical(domain_labels(world), categories=[d.name for d in world.domains]
                                           + [BACKGROUND]), "domain_idx": t["domain_idx"]}
    cols.update({k: t[k] for k in t if k.startswith("comp300_")})
    cols.update({k: t[k] for k in CONTEXT_COLUMNS})
    return cols


def extra_var(world: World) -> dict:
    p = world.panel
    return {"driver": p.driver, "driver_variable": p.variable, "context_coef": p.coef,
            "programme_domain": p.programme_domain}


def spot_table(world: World, barcodes: list[str]) -> dict[str, list]:
    """Per-spot truth for truth.json (columns; floats rounded to 6 decimals)."""
    t = world.truth_obs
    out: dict[str, list] = {"barcode": list(barcodes), "domain": [str(x) for x in domain_labels(world)]}
    for k in [*(k for k in t if k.startswith("comp300_")), *CONTEXT_COLUMNS]:
        v = t[k]
        out[k] = v.tolist() if np.issubdtype(v.dtype, np.integer) else np.round(v.astype(np.float64), 6).tolist()
    return out
