"""Readers that pair a slide image with its spots: AnnData + image, Space Ranger folders, HEST-1k samples.

Every reader returns a validated :class:`SlideSample` (coordinates in level-0 pixels of ``image_path``, a pixel
size and the rule that gave it). Pixel-size rules are in ``docs/readers.md``: an explicit ``um_per_px`` always
wins; otherwise ``pixel_size_from`` picks a source, and ``"auto"`` tries each reader's trusted sources in order
and raises :class:`PixelSizeError` listing the ways to supply one when none is available. Never guessed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec
from stalign.data.errors import BarcodeError, CoordinateError, DataPrepError, PixelSizeError, examples
from stalign.data.pixel_size import (
    VISIUM_FULLRES_DIAMETER_UM,
    VISIUM_PITCH_UM,
    PixelSizeCandidate,
    grid_candidate,
    knn_pitch_candidate,
    metadata_candidate,
    settle_pixel_size,
    spot_diameter_candidate,
)
from stalign.data.sample import SlideSample, check_sample, coords_from_obsm
from stalign.data.slide import open_slide
from stalign.data.tenx import find_tissue_positions, read_10x_h5, read_scalefactors, read_tissue_positions
from stalign.data.tissue_call import offer_in_tissue
from stofm.util.safe_files import require_path

WSI_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".jpg", ".jpeg", ".png")
#: HEST's ``spot_diameter_fullres`` spans its registration spot size: the metadata's ``spot_diameter``, except for
#: Xenium pseudo-spots, registered with HEST's default 55 µm (``register_downscale_img`` in HEST's ``readers.py``).
HEST_REGISTERED_DIAMETER_UM = {"Xenium": 55.0}
#: HEST technologies whose ``array_row``/``array_col`` lie on a grid of known packing (pitch: ``inter_spot_dist``).
HEST_GRID_PACKING = {"Visium": "hex", "Spatial Transcriptomics": "square"}


def _obs_grid(adata) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``obs['array_row']``, ``obs['array_col']`` as floats, or (None, None) when either is missing."""
    import pandas as pd

    if not {"array_row", "array_col"} <= set(adata.obs.columns):
        return None, None
    return tuple(pd.to_numeric(adata.obs[c], errors="coerce").to_numpy(np.float64)
                 for c in ("array_row", "array_col"))


def _slide_candidates(slide, coords: np.ndarray, *, diameter_px: float | None, diameter_um: float | None, where: str,
                      pitch_um: float | None, grid: PixelSizeCandidate,
                      diameter_label: str = "Visium spot diameter") -> dict[str, PixelSizeCandidate]:
    """The sources every reader offers: array grid, slide metadata, spot diameter, spot pitch (the grid fit when
    the array indices are there, else the spacing of the given spots)."""
    knn = knn_pitch_candidate(coords, pitch_um)

    def pitch() -> tuple[float, str]:
        try:
            return grid()
        except PixelSizeError:
            return knn()

    return {"grid": grid, "metadata": metadata_candidate(slide),
            "spot-diameter": spot_diameter_candidate(diameter_px, diameter_um, where, label=diameter_label),
            "pitch": pitch}


def _spatial_scalefactors(adata, library_id: str | None, what: str) -> tuple[dict, str]:
    spatial = adata.uns.get("spatial", {}) if hasattr(adata.uns, "get") else {}
    libs = list(spatial) if isinstance(spatial, dict) else []
    if library_id is None:
        if len(libs) != 1:
            return {}, (f"{what} (it has no uns['spatial'] library)" if not libs else
                        f"{what} ({len(libs)} libraries in uns['spatial']: {examples(libs)}; pass library_id)")
        library_id = libs[0]
    if library_id not in libs:
        raise DataPrepError(f"{what}: library_id {library_id!r} not in uns['spatial'] ({examples(libs)})")
    return dict(spatial[library_id].get("scalefactors", {})), f"{what} uns['spatial'][{library_id!r}]['scalefactors']"


def _load_h5ad(path: Path) -> Any:
    import anndata as ad

    require_path(path, "AnnData file")
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # h5py/anndata raise many types for corrupt files
        raise DataPrepError(f"{path}: cannot read as AnnData (.h5ad): {type(exc).__name__}: {exc}") from exc


def read_anndata_image(h5ad: str | os.PathLike | Any, image: str | os.PathLike, *, slide_id: str | None = None,
                       um_per_px: float | None = None, pixel_size_from: str = "auto",
                       spot_diameter_um: float | None = None, spot_pitch_um: float | None = None,
                       spatial_key: str = "spatial", library_id: str | None = None, crop_um: float = CropSpec.niche_um,
                       make_unique: bool = False) -> SlideSample:
    """An AnnData (path or object) whose ``obsm[spatial_key]`` holds (x, y) level-0 px of ``image``.

    Pixel size: ``um_per_px`` > ``pixel_size_from`` in {"grid", "metadata", "spot-diameter", "pitch"}; ``"auto"``
    tries the Visium array grid (``obs['array_row']``/``['array_col']``, ``spot_pitch_um`` = 100), the slide
    metadata, then the spot diameter (``uns['spatial'][lib]['scalefactors']['spot_diameter_fullres']`` spans
    ``spot_diameter_um`` = 65, Space Ranger's definition).
    """
    image = Path(image)
    h5ad_path = None if hasattr(h5ad, "obsm") else Path(h5ad)
    adata = h5ad if h5ad_path is None else _load_h5ad(h5ad_path)
    what = str(h5ad_path) if h5ad_path is not None else f"AnnData for {image}"
    coords = coords_from_obsm(adata, spatial_key, what=what)
    with open_slide(image) as slide:
        scalefactors, where = _spatial_scalefactors(adata, library_id, what)
        pitch_um = VISIUM_PITCH_UM if spot_pitch_um is None else spot_pitch_um
        rows, cols = _obs_grid(adata)
        candidates = _slide_candidates(
            slide, coords, diameter_px=scalefactors.get("spot_diameter_fullres"), where=where, pitch_um=pitch_um,
            diameter_um=VISIUM_FULLRES_DIAMETER_UM if spot_diameter_um is None else spot_diameter_um,
            grid=grid_candidate(rows, cols, coords, pitch_um=pitch_um, where=f"{what} obs"))
        px = settle_pixel_size(what=f"{image} + {what}", um_per_px=um_per_px, pixel_size_from=pixel_size_from,
                               candidates=candidates, auto_order=["grid", "metadata", "spot-diameter"],
                               must_agree=("metadata", "spot-diameter"))
        dims = slide.dimensions
    sample = SlideSample(slide_id=slide_id or (h5ad_path.stem if h5ad_path else image.stem), image_path=image,
                         adata=adata, coords_px=coords, um_per_px=px.um_per_px, pixel_size_source=px.source,
                         pixel_size_sources=px.sources, source_files=[p for p in (h5ad_path, image) if p is not None])
    return check_sample(sample, image_dims=dims, crop_um=crop_um, make_unique=make_unique,
                        expression_file=what, coords_file=f"{what} obsm[{spatial_key!r}]")


def _spaceranger_root(folder: Path) -> Path:
    for root in (folder, folder / "outs"):
        if (root / "filtered_feature_bc_matrix.h5").is_file():
            return root
    raise FileNotFoundError(f"{folder}: not a Space Ranger output folder (no filtered_feature_bc_matrix.h5 "
                            "here or in outs/)")


def read_spaceranger(folder: str | os.PathLike, *, image: str | os.PathLike | None = None,
                     slide_id: str | None = None, um_per_px: float | None = None, pixel_size_from: str = "auto",
                     spot_diameter_um: float | None = None, spot_pitch_um: float | None = None,
                     crop_um: float = CropSpec.niche_um, make_unique: bool = False, var_names: str = "gene_symbols",
                     tissue_from: str = "in_tissue") -> SlideSample:
    """In-tissue spots of a Space Ranger ``outs`` folder with the full-res ``image``, else the hires PNG (a blank
    placeholder hires PNG is skipped for the lowres one, with a warning).

    ``tissue_from="in_tissue"`` trusts Space Ranger's ``in_tissue`` column alone (prep skips its image tissue mask
    for this slide; the default); ``"image"`` applies the mask on top (``stalign.data.tissue_call``).

    Without ``image`` the spots are scaled by ``tissue_hires_scalef`` onto ``spatial/tissue_hires_image.png``
    (``tissue_lowres_image.png`` when there is no hires one). ``"auto"`` pixel size: the array grid (every
    position of the positions file, in tissue or not, against its ``array_row``/``array_col``; ``spot_pitch_um``
    = 100), then (with ``image``) its metadata, then ``spot_diameter_fullres`` (``spot_diameter_um`` = 65).
    """
    root = _spaceranger_root(Path(folder))
    matrix_path = root / "filtered_feature_bc_matrix.h5"
    spatial = root / "spatial"
    positions_path = find_tissue_positions(spatial)
    sf_path = spatial / "scalefactors_json.json"
    scalefactors = read_scalefactors(sf_path)
    adata = read_10x_h5(matrix_path, var_names=var_names)
    positions = read_tissue_positions(positions_path)
    adata, pos = in_tissue_rows(adata, positions, matrix_path, positions_path, unit="spots")
    image_path, scale, scale_note = spaceranger_image(image, spatial, scalefactors, sf_path)
    auto = ["grid", "metadata", "spot-diameter"] if image is not None else ["grid", "spot-diameter"]
    coords = pos[["x", "y"]].to_numpy(np.float64) * scale
    adata.obsm["spatial"] = coords
    diameter = scalefactors.get("spot_diameter_fullres")
    with open_slide(image_path) as slide:
        pitch_um = VISIUM_PITCH_UM if spot_pitch_um is None else spot_pitch_um
        grid = grid_candidate(positions["array_row"].to_numpy(), positions["array_col"].to_numpy(),
                              positions[["x", "y"]].to_numpy(np.float64) * scale, pitch_um=pitch_um,
                              where=f"{positions_path} ({scale_note})")
        candidates = _slide_candidates(
            slide, coords, diameter_px=None if diameter is None else float(diameter) * scale, grid=grid,
            diameter_um=VISIUM_FULLRES_DIAMETER_UM if spot_diameter_um is None else spot_diameter_um,
            pitch_um=pitch_um, where=f"spot_diameter_fullres {diameter} {scale_note} in {sf_path}")
        px = settle_pixel_size(what=str(root), um_per_px=um_per_px, pixel_size_from=pixel_size_from,
                               candidates=candidates, auto_order=auto, must_agree=("metadata", "spot-diameter"))
        dims = slide.dimensions
    sample = SlideSample(slide_id=slide_id or (root.parent.name if root.name == "outs" else root.name),
                         image_path=image_path, adata=adata, coords_px=coords, um_per_px=px.um_per_px,
                         pixel_size_source=px.source, pixel_size_sources=px.sources,
                         source_files=[matrix_path, positions_path, sf_path, image_path], tissue_from=tissue_from)
    return check_sample(sample, image_dims=dims, crop_um=crop_um, make_unique=make_unique,
                        expression_file=str(matrix_path), coords_file=f"{positions_path} (scaled {scale_note})")


def in_tissue_rows(adata: Any, positions: Any, matrix_path: Path, positions_path: Path, *, unit: str,
                   warn_absent: bool = True) -> tuple[Any, Any]:
    """The ``in_tissue`` rows of a Space Ranger count matrix (obs ``in_tissue`` set) and their rows of
    ``positions``. Every matrix barcode needs a position (else the two files are of different runs); with
    ``warn_absent``, in-tissue positions without counts (a trimmed or subset matrix) are left out with a warning, as
    scanpy's ``read_visium`` does. ``unit`` ("spots", "bins") names the rows in errors."""
    import warnings

    barcodes = adata.obs_names
    missing = barcodes[~barcodes.isin(positions.index)]
    if len(missing):
        raise BarcodeError(f"{len(missing)} of {len(barcodes)} barcodes of {matrix_path} have no row in "
                           f"{positions_path}, e.g. {examples(missing)}; positions have e.g. "
                           f"{examples(positions.index[:3])}")
    absent = positions.index[positions["in_tissue"].to_numpy()].difference(barcodes) if warn_absent else ()
    if len(absent):
        warnings.warn(f"{len(absent)} in-tissue positions of {positions_path} have no counts in {matrix_path} "
                      f"(a subset or trimmed matrix?), e.g. {examples(absent)}; using the matrix's "
                      f"{len(barcodes)} barcodes", stacklevel=3)
    in_tissue = positions.loc[barcodes, "in_tissue"].to_numpy()
    if not in_tissue.any():
        raise CoordinateError(f"{positions_path}: none of the {adata.n_obs} {unit} of {matrix_path} is marked "
                              "in_tissue=1")
    adata = adata[in_tissue].copy()
    adata.obs["in_tissue"] = True
    return adata, positions.loc[adata.obs_names]


def spaceranger_image(image: str | os.PathLike | None, spatial: Path, scalefactors: dict, sf_path: Path
                      ) -> tuple[Path, float, str]:
    """(the image, the scale of the positions' full-res px onto it, a note naming that scale): ``image`` (full
    res) when given, else :func:`spaceranger_png` with its scale factor."""
    if image is not None:
        return Path(image), 1.0, "full-res"
    image_path, key = spaceranger_png(spatial, scalefactors, sf_path)
    return image_path, float(scalefactors[key]), f"x {key} {scalefactors[key]}"


def spaceranger_png(spatial: Path, scalefactors: dict, sf_path: Path) -> tuple[Path, str]:
    """The hires PNG of a Space Ranger ``spatial`` folder and its scale-factor key, else the lowres one (also when
    the hires one is a blank/uniform placeholder, with a warning); one error when neither has a scale factor."""
    found = [(spatial / name, key) for key, name in (("tissue_hires_scalef", "tissue_hires_image.png"),
                                                     ("tissue_lowres_scalef", "tissue_lowres_image.png"))
             if (spatial / name).is_file() and key in scalefactors]
    if not found:
        raise FileNotFoundError(f"{spatial}: no tissue_hires_image.png/tissue_lowres_image.png with a scale "
                                f"factor in {sf_path.name}; pass the full-resolution image")
    usable = [(p, k) for p, k in found if not is_uniform_image(p)]
    if usable and usable[0] != found[0]:
        import warnings

        warnings.warn(f"{found[0][0]} is a blank/uniform placeholder; using {usable[0][0].name} instead",
                      stacklevel=3)
    return (usable or found)[0]


def is_uniform_image(path: Path, *, max_std: float = 2.0) -> bool:
    """True for a blank or single-colour placeholder image (every channel's std below ``max_std`` grey levels on a
    256-px thumbnail)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (256, 256))
        thumb = np.asarray(im.convert("RGB").resize((256, 256)), dtype=np.float32)
    return bool((thumb.reshape(-1, 3).std(0) < max_std).all())


def list_hest_samples(root: str | os.PathLike) -> list[str]:
    """Sample ids of a HEST-1k folder that have both ``st/<id>.h5ad`` and a slide in ``wsis/``."""
    root = Path(root)
    if not (root / "st").is_dir():
        raise FileNotFoundError(f"{root}: not a HEST-1k folder (no st/ sub-folder)")
    return sorted(p.stem for p in (root / "st").glob("*.h5ad") if _hest_wsi(root, p.stem) is not None)


def _hest_wsi(root: Path, sample_id: str) -> Path | None:
    for suffix in WSI_SUFFIXES:
        if (root / "wsis" / f"{sample_id}{suffix}").exists():
            return root / "wsis" / f"{sample_id}{suffix}"
    return None


def _hest_candidate(meta: dict, key: str, meta_path: Path) -> PixelSizeCandidate:
    """The µm/px of ``meta[key]`` (``settle_pixel_size`` refuses one outside ``PLAUSIBLE_UM_PER_PX``)."""
    def get() -> tuple[float, str]:
        value = _meta_um(meta, key)
        if value is None:
            raise PixelSizeError(f"{meta_path} has no usable {key!r} (got {meta.get(key)!r})")
        return value, f"HEST metadata ({key} in {meta_path.name})"
    return get


def _meta_um(meta: dict, key: str) -> float | None:
    try:
        value = float(meta.get(key))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) and value > 0 else None


def _hest_geometry(meta: dict, meta_path: Path, spot_diameter_um: float | None,
                   spot_pitch_um: float | None) -> tuple[float | None, str, float | None, str | None]:
    """(µm spanned by ``spot_diameter_fullres``, its note, pitch µm, grid packing or None) of one HEST sample: the
    caller's values, else ``spot_diameter`` / ``inter_spot_dist`` of ``metadata/<id>.json`` (µm, per sample:
    Visium 55/100, legacy ST 100/200, Visium HD its bin, Xenium its pseudo-spot)."""
    tech = str(meta.get("st_technology") or "")
    if spot_diameter_um is not None:
        diameter, note = spot_diameter_um, "spot_diameter_um given"
    elif tech in HEST_REGISTERED_DIAMETER_UM:
        diameter, note = HEST_REGISTERED_DIAMETER_UM[tech], f"HEST's {tech} registration"
    else:
        diameter, note = _meta_um(meta, "spot_diameter"), f"spot_diameter in {meta_path.name}"
    pitch = spot_pitch_um if spot_pitch_um is not None else _meta_um(meta, "inter_spot_dist")
    return diameter, note, pitch, HEST_GRID_PACKING.get(tech)


def read_hest(root: str | os.PathLike, sample_id: str, *, um_per_px: float | None = None,
              pixel_size_from: str = "auto", spot_diameter_um: float | None = None,
              spot_pitch_um: float | None = None,
              spatial_key: str = "spatial", library_id: str | None = None, crop_um: float = CropSpec.niche_um,
              make_unique: bool = False) -> SlideSample:
    """A HEST-1k sample: ``st/<id>.h5ad`` (spots in ``obsm['spatial']``, level-0 px), ``wsis/<id>.tif``,
    ``metadata/<id>.json``. ``"auto"`` pixel size: ``pixel_size_um_estimated`` (what HEST itself uses), then
    ``pixel_size_um_embedded``, then the slide metadata; ``"spot-diameter"``, ``"pitch"`` and ``"grid"`` (Visium
    and legacy ST ``array_row``/``array_col``) on request, with the sample's own ``spot_diameter`` and
    ``inter_spot_dist`` (µm) from its metadata unless ``spot_diameter_um`` / ``spot_pitch_um`` are given.
    """
    root = Path(root)
    h5ad_path = root / "st" / f"{sample_id}.h5ad"
    meta_path = root / "metadata" / f"{sample_id}.json"
    wsi = _hest_wsi(root, sample_id)
    if wsi is None:
        raise FileNotFoundError(f"{root / 'wsis'}: no slide for HEST sample {sample_id!r} "
                                f"(looked for {sample_id}{{{','.join(WSI_SUFFIXES)}}})")
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    except (OSError, ValueError) as exc:
        raise DataPrepError(f"{meta_path}: cannot read the HEST metadata JSON: {exc}") from exc
    adata = _load_h5ad(h5ad_path)
    coords = coords_from_obsm(adata, spatial_key, what=str(h5ad_path))
    scalefactors, where = _spatial_scalefactors(adata, library_id, str(h5ad_path))
    diameter_um, note, pitch_um, packing = _hest_geometry(meta, meta_path, spot_diameter_um, spot_pitch_um)
    rows, cols = _obs_grid(adata) if packing else (None, None)
    with open_slide(wsi) as slide:
        candidates = {
            "hest-estimated": _hest_candidate(meta, "pixel_size_um_estimated", meta_path),
            "hest-embedded": _hest_candidate(meta, "pixel_size_um_embedded", meta_path),
            **_slide_candidates(slide, coords, diameter_px=scalefactors.get("spot_diameter_fullres"),
                                diameter_um=diameter_um, where=f"{where}; {note}", pitch_um=pitch_um,
                                diameter_label="spot diameter",
                                grid=grid_candidate(rows, cols, coords, pitch_um=pitch_um, packing=packing or "hex",
                                                    where=f"{h5ad_path} obs" + ("" if packing else
                                                          " (no array grid known for st_technology "
                                                          f"{meta.get('st_technology')!r})"))),
        }
        px = settle_pixel_size(what=f"HEST sample {sample_id!r} in {root}", um_per_px=um_per_px,
                               pixel_size_from=pixel_size_from, candidates=candidates,
                               auto_order=["hest-estimated", "hest-embedded", "metadata"])
        dims = slide.dimensions
    sample = SlideSample(slide_id=sample_id, image_path=wsi, adata=adata, coords_px=coords, um_per_px=px.um_per_px,
                         pixel_size_source=px.source, pixel_size_sources=px.sources,
                         source_files=[p for p in (h5ad_path, wsi, meta_path) if p.is_file()])
    offer_in_tissue(sample)  # HEST samples whose obs carries in_tissue offer Space Ranger's call
    return check_sample(sample, image_dims=dims, crop_um=crop_um, make_unique=make_unique,
                        expression_file=str(h5ad_path), coords_file=f"{h5ad_path} obsm[{spatial_key!r}]")
