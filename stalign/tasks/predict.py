"""Whole-slide prediction: tile the tissue (or take given spots), embed spot + niche crops with parallel
slide readers, predict expression zero-shot by retrieval from a reference bank and/or with a few-shot head,
and return AnnData (plus heat-map PNGs over the H&E thumbnail)."""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec
from stalign.tasks.retrieval import gene_indices
from stalign.tasks.scverse import drawn_spot_diameter_um  # noqa: F401 - also imported from here
from stofm.util.errors import CoordinateError, InputError
from stofm.util.limits import check_limit
from stofm.util.safe_files import require_path


class NoTissueError(InputError):
    """The slide shows no tissue to predict on."""


def open_for_prediction(slide: Any, *, um_per_px: float | None = None) -> Any:
    """An opened ``Slide`` with a pixel size, or ``PixelSizeError`` telling how to give one."""
    from stalign.data.errors import PixelSizeError
    from stalign.data.slide import open_slide

    if isinstance(slide, (str, os.PathLike)):
        slide = open_slide(slide, um_per_px=um_per_px)
    if slide.um_per_px is None:
        note = f" ({slide.pixel_size_note})" if getattr(slide, "pixel_size_note", "") else ""
        raise PixelSizeError(f"{slide.path}: no pixel size in the file's metadata{note}; crops are cut at fixed µm, "
                             f"so pass um_per_px= (stalign predict --um-per-px), e.g. 0.5 for a 20x scan")
    return slide


def tile_tissue(slide: Any, *, step_px: float, thumb_size: int = 1024, min_fraction: float = 0.5) -> np.ndarray:
    """Centres (x, y) level-0 px of a square grid with pitch ``step_px`` over the tissue of ``slide``."""
    from stalign.data.tissue import spots_on_tissue, tissue_mask

    width, height = slide.dimensions
    if not (np.isfinite(step_px) and step_px > 0):
        raise InputError(f"the tile step must be > 0 px, got {step_px:g} px (--step-um)")
    n_tiles = math.ceil(width / step_px) * math.ceil(height / step_px)  # bounded before the grid is allocated
    check_limit("tiles", n_tiles, f"a {step_px:g}-px grid over {slide.path} ({width} x {height} px)")
    thumb, _ = slide.thumbnail(thumb_size)
    mask = tissue_mask(thumb)
    if not mask.any():
        raise NoTissueError(f"{slide.path}: no tissue found on the slide (blank or background only)")
    xs, ys = np.arange(step_px / 2, width, step_px), np.arange(step_px / 2, height, step_px)
    grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), -1).reshape(-1, 2)
    keep = spots_on_tissue(slide, grid, thumb_size=thumb_size, min_fraction=min_fraction, window_px=step_px,
                           mask=mask)
    if not keep.any():
        raise NoTissueError(f"{slide.path}: no {step_px:.0f}-px tile lies on tissue (tissue too small for the grid)")
    return grid[keep]


def read_coords(path: str | os.PathLike, *, with_obs: bool = False) -> tuple:
    """Spot centres (level-0 px) from an AnnData (obsm['spatial']) or a CSV with x and y columns, and the spot
    names; ``with_obs`` adds the other columns (the AnnData's obs, the CSV's other columns) as a DataFrame."""
    import pandas as pd

    path = require_path(path, "coordinates file")
    if path.suffix == ".h5ad":
        from stofm.util.safe_files import read_h5ad

        adata = read_h5ad(path, what="coordinates file")
        if "spatial" not in adata.obsm:
            raise CoordinateError(f"{path}: no obsm['spatial'] with spot centres")
        out = np.asarray(adata.obsm["spatial"], np.float64)[:, :2], list(adata.obs_names)
        return (*out, adata.obs.reset_index(drop=True)) if with_obs else out
    table = pd.read_csv(path)
    if not {"x", "y"} <= set(table.columns):
        raise CoordinateError(f"{path}: the CSV needs columns x and y (level-0 px), found {list(table.columns)}")
    names = table["barcode"].astype(str).tolist() if "barcode" in table.columns else None
    out = table[["x", "y"]].to_numpy(np.float64), names
    return (*out, table.drop(columns=[c for c in ("x", "y", "barcode") if c in table])) if with_obs else out


def outside_image(coords: np.ndarray, slide: Any) -> np.ndarray:
    """(N,) bool: spot centres (level-0 px) that lie outside the slide's image."""
    width, height = slide.dimensions
    c = np.asarray(coords, np.float64)
    return (c[:, 0] < 0) | (c[:, 1] < 0) | (c[:, 0] >= width) | (c[:, 1] >= height)


def check_coords(coords: Any, slide: Any) -> np.ndarray:
    """Given spot centres as (N, 2) float64: non-finite values are an error; centres outside the image are kept
    (their crops are blank padding) with a warning that counts them (``obs['outside_image']`` marks them)."""
    import warnings

    c = np.asarray(coords, np.float64)
    if c.ndim != 2 or c.shape[1] < 2 or len(c) == 0:
        raise CoordinateError(f"spot coordinates must be (n_spots, 2) level-0 px, got shape {c.shape}")
    c = c[:, :2]
    bad = ~np.isfinite(c).all(1)
    if bad.any():
        raise CoordinateError(f"{int(bad.sum())} spot coordinate(s) are NaN/inf (first at row {int(np.argmax(bad))})")
    out = outside_image(c, slide)
    if out.any():
        width, height = slide.dimensions
        warnings.warn(f"{int(out.sum())} of {len(c)} spot centres lie outside {slide.path} ({width} x {height} px): "
                      "their predictions come from blank crops; obs['outside_image'] marks them", stacklevel=3)
    return c


def settle_crop(model: Any, *, bank: Any = None, head: Any = None,
                crop: CropSpec | dict[str, Any] | None = None) -> CropSpec:
    """The crops to cut for ``model``: those of the reference ``bank``, else of the few-shot ``head``, else the
    model's own (its checkpoint's), else ``CropSpec()``; a source that differs from the one taken is warned about
    with both specs named. ``crop``: a whole ``CropSpec``, or a dict of the settings to change (e.g.
    ``{"resample": "lanczos"}``); other crop sizes or stain normalisation than the bank's are refused (its
    embeddings would not be comparable), other settings warned about. The stain normalisation of the source taken
    (``CropSpec.stain_norm`` and its target) is applied by the crop reader like the sizes."""
    import warnings

    from stalign.data.crop_spec import CropSpecError, CropSpecWarning, warn_if_differs

    sources = [("the reference bank", "was embedded from", CropSpec.from_dict(getattr(bank, "info", None))),
               ("the few-shot head", "was fitted on", CropSpec.from_dict(getattr(head, "embedding_info", None))),
               ("the model", "was trained on", getattr(model, "crop_spec", None))]
    bank_crops = sources[0][2]
    known = [(name, verb, spec) for name, verb, spec in sources if spec is not None]
    if known:
        (name, verb, base), *others = known
        for other_name, other_verb, other in others:
            warn_if_differs(base, f"{name} {verb}", other, f"{other_name} {other_verb}")
    else:
        name, verb, base = "the default", "is", CropSpec()
        if crop is None:
            warnings.warn(f"the model, reference and head record no crop spec: cutting the default crops ({base})",
                          CropSpecWarning, stacklevel=3)
    if crop is None:
        return base
    asked = crop if isinstance(crop, CropSpec) else base.with_overrides(**crop)
    sizes_and_stain = ("spot_um", "niche_um", "patch_px", "stain_norm", "stain_matrix", "stain_max")
    if bank_crops is not None and any(getattr(asked, k) != getattr(base, k) for k in sizes_and_stain):
        raise CropSpecError(f"the reference bank was embedded from crops {base}; this prediction asks for {asked}: "
                            "query and bank embeddings would not be comparable (drop the crop options, or build the "
                            "bank from shards prepared with these crops)")
    warn_if_differs(asked, "this prediction asks for", base, f"{name} {verb}")
    return asked


def checked_reference(model: Any, reference: Any, *, slide: Any, head: Any = None,
                      crop: CropSpec | dict[str, Any] | None = None,
                      query_genes: Sequence[str] | None = None) -> tuple[Any, CropSpec, list[str]]:
    """Before any embedding: open the reference (a saved bank is loaded, a shards folder's manifest read), settle
    the crops (:func:`settle_crop`) and run the reference/query checks (``stalign.tasks.query_checks``: pixel
    sizes, upsampling, gene panel overlap; warnings). Returns (the reference for ``load_reference``, the crop
    spec, the warnings' messages)."""
    from stalign.tasks.query_checks import check_query, open_reference

    summary = open_reference(reference) if reference is not None else None
    crop = settle_crop(model, bank=summary, head=head, crop=crop)
    notes = check_query(summary, crop=crop, query_um_per_px=float(slide.um_per_px), query=str(slide.path),
                        model_genes=list(model.genes), query_genes=query_genes)
    if summary is not None and summary.bank is not None:
        reference = summary.bank
    return reference, crop, notes


def embed_slide(model: Any, slide: Any, *, crop: CropSpec, coords: Any = None, um_per_px: float | None = None,
                step_um: float | None = None, batch_size: int = 32, workers: int = 0, device: str | None = None,
                niche_weight: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Image embeddings (N, E) of the ``crop`` crops around the spots of ``slide`` (``coords`` level-0 px, else
    tissue tiles every ``step_um``, default the spot width). ``workers``: readers beside the model
    (``stalign.tasks.crop_reading.reading_plan``). Returns {"embeddings", "coords", "slide", "tiled", "crop"}.
    """
    from stalign.tasks.embed import SlideCrops, embed_slide_crops

    slide = open_for_prediction(slide, um_per_px=um_per_px)
    mpp = float(slide.um_per_px)
    tiled = coords is None
    if tiled:
        coords = tile_tissue(slide, step_px=float(crop.spot_um if step_um is None else step_um) / mpp)
    coords = np.asarray(coords, np.float64).reshape(-1, 2)
    if len(coords) == 0:
        raise CoordinateError("no spot coordinates to embed")
    crops = SlideCrops(slide=slide, centers_px=coords, crop=crop)
    emb = embed_slide_crops(model, crops, batch_size=batch_size, workers=workers, device=device,
                            niche_weight=niche_weight, progress=progress)
    return {"embeddings": emb.astype(np.float32), "coords": coords, "slide": slide, "tiled": tiled, "crop": crop}


def predict_slide(model: Any, slide: Any, *, reference: Any = None, coords: Any = None,
                  barcodes: Sequence[str] | None = None, um_per_px: float | None = None,
                  crop: CropSpec | dict[str, Any] | None = None, step_um: float | None = None, k: int = 50,
                  temperature: float = 0.05, fewshot_head: Any = None, genes: Sequence[str] | None = None,
                  batch_size: int = 32, workers: int = 0, device: str | None = None, niche_weight: float = 0.5,
                  index: str = "auto",
                  index_params: dict[str, int] | None = None, spot_diameter_um: float | None = None,
                  query_genes: Sequence[str] | None = None, library_id: str | None = None, progress: bool = True,
                  cache: bool = True):
    """Predict expression over ``slide`` (path or ``Slide``); returns AnnData.

    ``reference``: a ``ReferenceBank``, a saved bank folder or a shards folder (zero-shot retrieval, top-``k``,
    softmax(similarity / ``temperature``); ``index``/``index_params``: the search engine, ``ReferenceBank.topk``);
    ``fewshot_head``: a fitted expression head (``stalign.tasks.fewshot``).
    ``coords`` (N, 2) level-0 px, else the tissue is tiled every ``step_um`` (default: the spot size).
    ``crop``: see :func:`settle_crop` (default: the crops of the bank, else of the head, else the model's).
    X holds the few-shot prediction when a head is given, else the zero-shot one; both are in
    ``layers``; image embeddings in ``obsm['X_stalign']``, centres in ``obsm['spatial']``, settings in ``uns['stalign']``.
    ``spot_diameter_um`` (what ``sc.pl.spatial`` draws, ``spot_diameter_fullres``): the tile width for tiles; for
    given ``coords`` 0.55 x their median nearest-neighbour distance (a Visium spot: 55 µm at a 100 µm pitch), at
    most the crop width. ``query_genes``: the genes the query's own expression measures (the panel-overlap check,
    :func:`checked_reference`). ``library_id``: the key in ``uns['spatial']`` (default: the image's file name).
    ``cache``: a shards reference is embedded through the feature store (False: embedded again, nothing stored).
    """
    import anndata as ad
    import pandas as pd

    from stalign.tasks.embed import load_reference
    from stalign.tasks.fewshot import head_predict

    if reference is None and fewshot_head is None:
        raise InputError("give a reference (bank or shards) for zero-shot prediction and/or a few-shot head")
    label_head = fewshot_head is not None and not hasattr(fewshot_head, "genes")  # prototype/logistic
    if label_head and reference is None:
        raise InputError(f"the {fewshot_head.kind} few-shot head predicts region labels, not expression: give a "
                         f"reference (bank or shards) too for the expression in X")
    genes = list(model.genes) if genes is None else [str(g) for g in genes]
    gene_indices(model.genes, genes, what="the model")  # lists every query gene the model lacks
    slide = open_for_prediction(slide, um_per_px=um_per_px)  # a missing slide or pixel size fails before any work
    if coords is not None:
        coords = check_coords(coords, slide)
    reference, crop, notes = checked_reference(model, reference, slide=slide, head=fewshot_head, crop=crop,
                                               query_genes=query_genes)
    bank = load_reference(reference, model, batch_size=batch_size, workers=workers, device=device,
                          progress=progress, cache=cache) if reference is not None else None
    e = embed_slide(model, slide, crop=crop, coords=coords, um_per_px=um_per_px, step_um=step_um,
                    batch_size=batch_size, workers=workers, device=device, niche_weight=niche_weight,
                    progress=progress)
    emb, coords, slide = e["embeddings"], e["coords"], e["slide"]
    layers: dict[str, np.ndarray] = {}
    if bank is not None:
        layers["zero_shot"] = bank.predict(emb, k=min(k, len(bank)), temperature=temperature, genes=genes,
                                           index=index, index_params=index_params)
    if fewshot_head is not None and not label_head:
        layers["fewshot"] = np.asarray(head_predict(fewshot_head, emb, genes), np.float32)
    for name, values in layers.items():
        bad = ~np.isfinite(values).all(1)
        if bad.any():
            raise InputError(f"{int(bad.sum())} of {len(bad)} {name.replace('_', '-')} predictions are NaN/inf; the "
                             "model, reference or head is damaged - nothing was written")
    x_source = "fewshot" if "fewshot" in layers else "zero_shot"
    names = list(barcodes) if barcodes is not None else [f"tile_{i}" for i in range(len(coords))]
    if len(names) != len(coords):
        raise InputError(f"{len(names)} barcodes for {len(coords)} spots")
    settings = {"slide": str(Path(slide.path).resolve()),  # absolute: heat maps redrawn from any folder
                "um_per_px": float(slide.um_per_px),
                "pixel_size_source": slide.pixel_size_source, "pixel_size_note": getattr(slide, "pixel_size_note", ""),
                **crop.to_dict(), "tiled": e["tiled"],
                "k": int(k), "temperature": float(temperature), "index": index, "niche_weight": float(niche_weight), "X": x_source,
                "units": _units(bank, fewshot_head),
                "model": str(getattr(model, "meta", {}).get("name", "")),
                "reference": bank.info.get("source", "") if bank is not None else "",
                "reference_spots": len(bank) if bank is not None else 0,
                "fewshot_head": getattr(fewshot_head, "kind", "") if fewshot_head is not None else "",
                "query_warnings": " | ".join(notes)}
    obs = pd.DataFrame(index=pd.Index(names, dtype=str))
    obs["outside_image"] = outside_image(coords, slide)
    if label_head:
        obs["predicted_label"] = pd.Categorical(np.asarray(fewshot_head.predict(emb)).astype(str))
    from stalign.tasks.scverse import add_spatial_images

    out = ad.AnnData(X=layers[x_source].copy(), obs=obs, var=pd.DataFrame(index=pd.Index(genes, dtype=str)),
                     layers=layers, obsm={"spatial": coords, "X_stalign": emb}, uns={"stalign": settings})
    diameter_um = drawn_spot_diameter_um(spot_diameter_um, coords if not e["tiled"] else None, crop.spot_um,
                                         float(slide.um_per_px))
    settings["spot_diameter_um"] = diameter_um
    settings["library_id"] = add_spatial_images(out, slide, spot_diameter_px=diameter_um / float(slide.um_per_px),
                                                library_id=library_id)
    return out


def _units(bank: Any, head: Any) -> str:
    """What the values of X are: the reference's expression units (log1p of counts per 10k, or as given)."""
    info = bank.info if bank is not None else getattr(head, "embedding_info", {}) or {}
    kind = info.get("expression")
    return {"log1p_cp10k": "log1p(counts per 10,000) of the reference", "as_given": "the reference's own units "
            "(given already normalised)"}.get(kind, "the units of the reference/head's training expression")


def write_heatmaps(adata: Any, slide: Any, genes: Sequence[str], out_dir: str | os.PathLike, *,
                   layer: str | None = None, mode: str = "spots", panel: bool = False, thumb_size: int = 1024,
                   label: str = "predicted expression", spot_diameter_px: float | None = None,
                   limits: Sequence[tuple[float, float]] | None = None, units: str | None = None) -> list[Path]:
    """Heat-map PNGs of ``genes`` of a ``predict_slide`` result (or ``layer``) over the slide's thumbnail.

    Circles are ``spot_diameter_px`` wide (level-0 px; e.g. a Visium spot's 55 µm), else the tile width when the
    slide was tiled, else the nearest-spot spacing. ``units`` (the colour bars' units): default the prediction's
    (``uns['stalign']['units']``: the reference's or head's expression setting)."""
    from stalign.tasks.heatmaps import plot_gene_heatmaps

    slide = open_for_prediction(slide, um_per_px=adata.uns.get("stalign", {}).get("um_per_px"))
    cols = gene_indices(list(adata.var_names), list(genes), what="the prediction")
    values = adata.layers[layer] if layer else adata.X
    thumb, ds = slide.thumbnail(thumb_size)
    settings = adata.uns.get("stalign", {})
    diameter = spot_diameter_px
    if diameter is None and settings.get("tiled") and settings.get("um_per_px"):
        diameter = float(settings["spot_um"]) / float(settings["um_per_px"])
    return plot_gene_heatmaps(np.asarray(values)[:, cols], list(genes), adata.obsm["spatial"], out_dir,
                              thumbnail=thumb, downsample=ds, spot_diameter_px=diameter, mode=mode, panel=panel,
                              label=label, limits=limits, um_per_px=slide.um_per_px,
                              units=units or settings.get("units"))
