"""Synthetic slides with a known image -> expression link (``stalign data synth``).

``make_synthetic_slide`` writes, for one slide:

- ``<slide_id>.tif``: an H&E-like pyramidal TIFF (256 px tiles, levels 4x apart, deflate, resolution tags in
  pixels/cm so openslide reports ``openslide.mpp-x``), generated block by block in bounded memory;
- ``<slide_id>.h5ad``: integer counts on a Visium-like hex grid (100 µm pitch, 55 µm spots), ``obsm['spatial']``
  in level-0 pixels, the ground-truth image variables in ``obs``, the gene programmes in ``var`` and ``uns``;
- ``<slide_id>.truth.json``: the same truth in plain JSON plus sha256 of both files (written last).

Version 2 (default) adds spatial domains, capillaries along a slide gradient and context-driven genes
(``stalign.lab.synth_world``); version 1 (expression from the spot alone) stays byte-identical. Version 3 keeps
v2's genes and draws classes that share their mean stain and differ in morphology (``stalign.lab.synth_morph``),
through a per-site and per-slide stain, illumination and scanner (``stalign.lab.synth_stain``);
``make_synthetic_sites`` makes a multi-site set.
See ``docs/synth.md``, ``stalign.lab.synth_expression`` and ``stalign.lab.synth_context`` for the model and
``stalign.lab.synth_truth.truth_of`` for reading the truth back.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from stalign.data.pixel_size import VISIUM_FULLRES_DIAMETER_UM
from stalign.lab.synth_expression import (
    BACKGROUND_LIBRARY,
    DISPERSION,
    LIBRARY_LOG_SD,
    LIBRARY_MEDIAN,
    NAF_REF,
    NAF_SCALE,
    PITCH_UM,
    SPOT_DIAMETER_UM,
    GenePanel,
    counts_from_rates,
    expression_rates,
    gene_records,
    hex_grid,
    make_panel,
    spot_truth,
)
from stalign.lab.synth_render import build_layout, render_blocks, write_pyramid
from stalign.lab.synth_texture import TISSUE_CLASSES
from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path
from stofm.util.safe_files import DamagedFileError, sha256_of

FORMAT = "stalign-synthetic"
VERSION = 2  # the default world; version 1 (spot-only expression) stays byte-reproducible
VERSIONS = (1, 2, 3)
BACKGROUND = "background"


@dataclass(frozen=True)
class SyntheticSlide:
    """Paths of the written files (``image``, ``adata``, ``truth``) and the ground truth (``truth.json``)."""

    paths: dict[str, Path]
    truth: dict = field(repr=False)
    seconds: float = 0.0  # generation time (not part of the files)

    @property
    def slide_id(self) -> str:
        return self.truth["slide_id"]

    @property
    def um_per_px(self) -> float:
        return float(self.truth["um_per_px"])


def make_synthetic_slide(out_dir: str | os.PathLike, *, n_spots: int = 200, um_per_px: float = 0.5,
                         n_genes: int = 200, n_classes: int = 4, seed: int = 0, slide_id: str | None = None,
                         programme_factor: float = 4.0, panel_seed: int = 0, margin_um: float = 400.0,
                         progress: bool = True, version: int = VERSION, n_domains: int = 4,
                         domain_layout: str = "layers", site: int = 0) -> SyntheticSlide:
    """Generate one synthetic slide into ``out_dir``; same arguments give byte-identical files.

    ``panel_seed`` fixes the gene programmes (shared by slides of one data set); ``seed`` draws the tissue.
    ``version=2`` (default): spatial domains (``n_domains``, ``domain_layout`` "layers" or "islands") and
    context-driven genes next to the spot-driven ones (``stalign.lab.synth_world``); ``version=1``: expression
    depends on the spot alone, byte-identical to the files this generator wrote before v2 existed; ``version=3``:
    v2's genes over morphology-defined classes, seen through the stain of ``site`` (drawn from ``panel_seed`` and
    ``site``) and of this slide (drawn from ``seed``).
    """
    _check(n_spots=n_spots, um_per_px=um_per_px, n_classes=n_classes, programme_factor=programme_factor,
           margin_um=margin_um)
    if version not in VERSIONS:
        raise InputError(f"version must be one of {VERSIONS}, got {version!r}")
    if version >= 2:
        from stalign.lab.synth_context import make_context_panel
        from stalign.lab.synth_domains import DOMAIN_LAYOUTS, make_domains

        if domain_layout not in DOMAIN_LAYOUTS:
            raise InputError(f"domain_layout must be one of {DOMAIN_LAYOUTS}, got {domain_layout!r}")
        names = [c.name for c in TISSUE_CLASSES[:n_classes]]
        make_context_panel(n_genes=n_genes, class_names=names, factor=programme_factor, seed=panel_seed,
                           domains=make_domains(names, n_domains, seed=panel_seed))  # argument checks first
    slide_id = slide_id or f"synth{seed}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = TISSUE_CLASSES[:n_classes]
    look = populate = None
    if version == 3:
        from stalign.lab.synth_morph import MORPH_CLASSES, populate_morph_layout
        from stalign.lab.synth_stain import Look, site_stain, slide_stain

        classes, populate = MORPH_CLASSES[:n_classes], populate_morph_layout
        site_look = site_stain(site, panel_seed=panel_seed)
        look = Look(stain=slide_stain(site_look, np.random.default_rng(np.random.SeedSequence([seed, 41]))),
                    aniso=tuple(c.fibre_aniso for c in classes))
    layout_rng, render_rng, expr_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))

    t0 = time.perf_counter()
    centres, rows, cols = hex_grid(n_spots, margin_um=margin_um)
    box = (margin_um - PITCH_UM / 2, margin_um - PITCH_UM / 2,
           centres[:, 0].max() + PITCH_UM / 2, centres[:, 1].max() + PITCH_UM / 2)
    width_um, height_um = box[2] + margin_um - PITCH_UM / 2, box[3] + margin_um - PITCH_UM / 2
    world = None
    if version == 1:
        panel = make_panel(n_genes=n_genes, class_names=[c.name for c in classes], factor=programme_factor,
                           seed=panel_seed)
        layout = build_layout(width_um=width_um, height_um=height_um, array_box=box, classes=classes,
                              um_per_px=um_per_px, rng=layout_rng)
        truth_obs = spot_truth(layout, centres)
        counts, size = counts_from_rates(expression_rates(panel, truth_obs), truth_obs["in_tissue"], expr_rng)
    else:
        from stalign.lab.synth_world import build_world

        world = build_world(width_um=width_um, height_um=height_um, array_box=box, centres_um=centres,
                            classes=classes, um_per_px=um_per_px, n_genes=n_genes, programme_factor=programme_factor,
                            panel_seed=panel_seed, n_domains=n_domains, domain_layout=domain_layout,
                            layout_rng=layout_rng, expr_rng=expr_rng, populate=populate)
        layout, truth_obs, counts, size, panel = world.layout, world.truth_obs, world.counts, world.size, world.panel

    paths = {"image": out / f"{slide_id}.tif", "adata": out / f"{slide_id}.h5ad",
             "truth": out / f"{slide_id}.truth.json"}
    shapes = write_pyramid(paths["image"], render_blocks(layout, rng=render_rng, progress=progress, look=look),
                           height=layout.height_px, width=layout.width_px, um_per_px=um_per_px)
    truth = {
        "format": FORMAT, "version": version, "slide_id": slide_id, "seed": seed, "panel_seed": panel_seed,
        "um_per_px": um_per_px, "spot_diameter_um": SPOT_DIAMETER_UM, "pitch_um": PITCH_UM,
        "level_shapes_hw": [list(map(int, s)) for s in shapes], "n_spots": n_spots,
        "n_in_tissue": int(truth_obs["in_tissue"].sum()), "n_nuclei": len(layout.nuclei),
        "n_holes": len(layout.holes), "classes": [asdict(c) for c in classes],
        "class_spot_counts": {c.name: int(((truth_obs["tissue_class_idx"] == k) & truth_obs["in_tissue"]).sum())
                              for k, c in enumerate(classes)},
        "programme_factor": programme_factor,
        "model": {"formula": "rate = base * factor**[class == programme_class] * exp(beta * (naf - naf_ref) / "
                             "naf_scale) * exp(gamma * hole_fraction); counts ~ NB(size_factor * rate, "
                             "dispersion)", "naf_ref": NAF_REF, "naf_scale": NAF_SCALE,
                  "dispersion": DISPERSION, "library_median": LIBRARY_MEDIAN, "library_log_sd": LIBRARY_LOG_SD,
                  "background_library": BACKGROUND_LIBRARY},
        "genes": gene_records(panel),
    }
    if world is not None:
        from stalign.lab.synth_world import FORMULA_V2, spot_table

        truth["model"]["formula"] = FORMULA_V2
        truth["context"] = world.info
        truth["spots"] = spot_table(world, barcodes(n_spots))
    if look is not None:
        truth["site"] = f"site{site}"
        truth["slide"] = slide_id
        truth["stain"] = {"site": site_look.record(), "slide": look.stain.record()}
    _write_h5ad(paths["adata"], counts=counts, centres_um=centres, rows=rows, cols=cols, truth_obs=truth_obs,
                size=size, panel=panel, classes=[c.name for c in classes], slide_id=slide_id,
                um_per_px=um_per_px, truth=truth, world=world)
    truth["files"] = {k: {"name": paths[k].name, "sha256": sha256_of(paths[k])} for k in ("image", "adata")}
    with atomic_write_path(paths["truth"]) as tmp:
        tmp.write_text(json.dumps(truth, indent=1) + "\n")
    return SyntheticSlide(paths=paths, truth=truth, seconds=time.perf_counter() - t0)


def _check(*, n_spots: int, um_per_px: float, n_classes: int, programme_factor: float, margin_um: float) -> None:
    if n_spots < 1:
        raise InputError(f"n_spots must be >= 1, got {n_spots}")
    if not 0.05 <= um_per_px <= 20:
        raise InputError(f"um_per_px must lie in [0.05, 20], got {um_per_px}")
    if not 1 <= n_classes <= len(TISSUE_CLASSES):
        raise InputError(f"n_classes must lie in [1, {len(TISSUE_CLASSES)}], got {n_classes}")
    if programme_factor <= 0:
        raise InputError(f"programme_factor must be > 0, got {programme_factor}")
    if margin_um < SPOT_DIAMETER_UM:
        raise InputError(f"margin_um must be >= {SPOT_DIAMETER_UM}, got {margin_um}")


def barcodes(n: int) -> list[str]:
    """Visium-looking, unique barcodes (16 bases + ``-1``) derived from the spot index.

    An odd multiplier is a bijection modulo 4**16, so distinct indices give distinct (scrambled) barcodes.
    """
    code = (np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B1)) % np.uint64(4**16)
    digits = (code[:, None] // (np.uint64(4) ** np.arange(15, -1, -1, dtype=np.uint64))[None, :]) % np.uint64(4)
    bases = np.array(list("ACGT"))[digits]
    return ["".join(b) + "-1" for b in bases]


def _write_h5ad(path: Path, *, counts: np.ndarray, centres_um: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                truth_obs: dict[str, np.ndarray], size: np.ndarray, panel: GenePanel, classes: list[str],
                slide_id: str, um_per_px: float, truth: dict, world=None) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    cls_idx = truth_obs["tissue_class_idx"]
    # v2+: Visium's own numbering (array_col steps of 2 along a row, odd rows shifted) and Space Ranger's 65 µm
    # definition of spot_diameter_fullres, so the readers' grid and spot-diameter sources agree with the TIFF's
    # resolution; v1 keeps the bytes it was pinned with (plain columns, 55 µm).
    if world is not None:
        cols, diameter_um = 2 * cols + rows % 2, VISIUM_FULLRES_DIAMETER_UM
    else:
        diameter_um = SPOT_DIAMETER_UM
    names = np.where(truth_obs["in_tissue"], np.array(classes, dtype=object)[cls_idx], BACKGROUND)
    obs = pd.DataFrame({
        "in_tissue": truth_obs["in_tissue"].astype(np.int64), "array_row": rows.astype(np.int64),
        "array_col": cols.astype(np.int64),
        "tissue_class": pd.Categorical(names, categories=[*classes, BACKGROUND]),
        "tissue_class_idx": np.where(truth_obs["in_tissue"], cls_idx, -1),
        **{k: truth_obs[k] for k in ("nuclear_area_fraction", "nuclei_per_mm2", "hole_fraction",
                                     "density_factor", "tissue_opacity")},
        "size_factor": size.astype(np.float64),
    }, index=pd.Index(barcodes(len(counts)), name="barcode"))
    var = pd.DataFrame({"programme": panel.programme, "programme_class": panel.programme_class,
                        "base_rate": panel.base, "class_factor": panel.factor, "beta_density": panel.beta,
                        "gamma_holes": panel.gamma}, index=pd.Index(panel.names, name="gene"))
    if world is not None:  # synth v2: domains, context drivers, gene drivers
        from stalign.lab.synth_world import extra_obs, extra_var

        obs = obs.assign(**extra_obs(world))
        var = var.assign(**extra_var(world))
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = (centres_um / um_per_px).astype(np.float64)
    adata.uns["spatial"] = {slide_id: {"scalefactors": {"spot_diameter_fullres": diameter_um / um_per_px,
                                                        "tissue_hires_scalef": 1.0},
                                       "metadata": {"source": FORMAT}}}
    adata.uns["synthetic"] = {k: truth[k] for k in ("format", "version", "slide_id", "seed", "panel_seed",
                                                    "um_per_px", "spot_diameter_um", "pitch_um",
                                                    "programme_factor")}
    adata.uns["synthetic"]["classes"] = classes
    adata.uns["synthetic"]["model"] = truth["model"]
    if world is not None:
        adata.uns["synthetic"]["context"] = _h5_safe(truth["context"])
    if "site" in truth:  # v3: which site and slide, and their stain
        adata.obs["site"] = pd.Categorical([truth["site"]] * adata.n_obs)
        adata.obs["slide"] = pd.Categorical([slide_id] * adata.n_obs)
        adata.uns["synthetic"].update(site=truth["site"], slide=slide_id, stain=truth["stain"])
    with atomic_write_path(path) as tmp:
        adata.write_h5ad(tmp)


def _h5_safe(value):
    """A JSON-like value that h5py can store in ``uns`` (None -> "none"; lists of dicts -> dicts by index)."""
    if value is None:
        return "none"
    if isinstance(value, dict):
        return {k: _h5_safe(v) for k, v in value.items()}
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return {str(i): _h5_safe(v) for i, v in enumerate(value)}
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def load_synthetic_slide(out_dir: str | os.PathLike, slide_id: str, *, verify: bool = True) -> SyntheticSlide:
    """A slide written earlier by ``make_synthetic_slide`` (its ``truth.json`` and files; sha256 checked)."""
    out = Path(out_dir)
    truth_path = out / f"{slide_id}.truth.json"
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: no synthetic slide {slide_id!r} here (truth.json is written last)")
    truth = json.loads(truth_path.read_text())
    if truth.get("format") != FORMAT:
        raise InputError(f"{truth_path}: not a {FORMAT} truth file")
    paths = {"image": out / truth["files"]["image"]["name"], "adata": out / truth["files"]["adata"]["name"],
             "truth": truth_path}
    for kind in ("image", "adata"):
        if not paths[kind].is_file():
            raise FileNotFoundError(f"{paths[kind]}: missing ({truth_path} lists it)")
        if verify and sha256_of(paths[kind]) != truth["files"][kind]["sha256"]:
            raise DamagedFileError(f"{paths[kind]}: sha256 differs from the one in {truth_path}; the file changed")
    return SyntheticSlide(paths=paths, truth=truth)


def ensure_synthetic_slide(out_dir: str | os.PathLike, *, n_spots: int = 200, um_per_px: float = 0.5,
                           seed: int = 0, slide_id: str | None = None, version: int = VERSION,
                           **kwargs) -> SyntheticSlide:
    """The slide in ``out_dir`` when one with these size/seed/pixel-size/version settings is there intact, else
    made anew."""
    slide_id = slide_id or f"synth{seed}"
    try:
        slide = load_synthetic_slide(out_dir, slide_id)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError):
        slide = None
    site = f"site{kwargs.get('site', 0)}" if version == 3 else None
    if slide is not None and (slide.truth["n_spots"], slide.truth["um_per_px"], slide.truth["seed"],
                              slide.truth.get("version", 1), slide.truth.get("site")) == (
                                  n_spots, um_per_px, seed, version, site):
        return slide
    return make_synthetic_slide(out_dir, n_spots=n_spots, um_per_px=um_per_px, seed=seed, slide_id=slide_id,
                                version=version, **kwargs)


def make_synthetic_dataset(out_dir: str | os.PathLike, *, n_slides: int = 1, seed: int = 0,
                           **kwargs) -> list[SyntheticSlide]:
    """``n_slides`` slides with seeds ``seed, seed+1, ...`` and one shared gene panel (ids ``synth<seed>``)."""
    if n_slides < 1:
        raise InputError(f"n_slides must be >= 1, got {n_slides}")
    return [make_synthetic_slide(out_dir, seed=seed + i, **kwargs) for i in range(n_slides)]


def make_synthetic_sites(out_dir: str | os.PathLike, *, n_sites: int = 3, slides_per_site: int = 2, seed: int = 0,
                         ensure: bool = False, **kwargs) -> list[SyntheticSlide]:
    """A synth v3 set of ``n_sites`` sites x ``slides_per_site`` slides (ids ``site<s>_slide<j>``, seeds ``seed``,
    ``seed + 1``, ... in that order) sharing one gene panel; ``ensure``: reuse intact slides already there."""
    if n_sites < 1 or slides_per_site < 1:
        raise InputError(f"n_sites and slides_per_site must be >= 1, got {n_sites} and {slides_per_site}")
    make = ensure_synthetic_slide if ensure else make_synthetic_slide
    return [make(out_dir, seed=seed + s * slides_per_site + j, slide_id=f"site{s}_slide{j}", version=3, site=s,
                 **kwargs) for s in range(n_sites) for j in range(slides_per_site)]
