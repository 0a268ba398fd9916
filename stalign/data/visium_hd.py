"""Visium HD (Space Ranger >= 3) binned outputs: one ``binned_outputs/square_XXXum`` folder -> :class:`SlideSample`.

10x writes, per bin size, ``binned_outputs/square_XXXum/filtered_feature_bc_matrix.h5`` and ``spatial/`` with
``tissue_positions.parquet`` (barcode, in_tissue, array_row, array_col, pxl_row_in_fullres, pxl_col_in_fullres),
``scalefactors_json.json`` (``microns_per_pixel``, ``bin_size_um``, ``spot_diameter_fullres`` = the bin width in
full-res px, ``tissue_hires_scalef``, ``tissue_lowres_scalef``) and the hires/lowres PNGs. Rules in docs/readers.md.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec
from stalign.data.errors import CoordinateError, PixelSizeError
from stalign.data.pixel_size import (
    PixelSizeCandidate,
    grid_candidate,
    metadata_candidate,
    settle_pixel_size,
    spot_diameter_candidate,
)
from stalign.data.readers import in_tissue_rows, spaceranger_image
from stalign.data.sample import SlideSample, check_sample
from stalign.data.slide import check_um_per_px, open_slide
from stalign.data.tenx import POSITION_COLUMNS, positions_frame, read_10x_h5, read_scalefactors
from stofm.util.errors import InputError, MissingDependencyError
from stofm.util.safe_files import require_path

BIN_FOLDER = re.compile(r"square_(\d{3})um")
#: The bin read when none is asked for (when present): the 16 µm bins are the closest to a 55 µm Visium spot
#: that Space Ranger writes by default; the 2 µm bins are millions per slide and nearly empty each.
DEFAULT_BIN_UM = 16
#: ``pixel_size_from`` values of :func:`read_visium_hd`, ``"auto"`` then its order.
HD_PIXEL_SIZE_CHOICES = ("auto", "scalefactors", "grid", "spot-diameter", "metadata")
MISSING_PYARROW = "reading Visium HD positions (parquet) needs pyarrow: pip install 'stalign[visium-hd]'"


def find_bins(folder: str | os.PathLike) -> dict[int, Path]:
    """Bin size (µm) -> ``square_XXXum`` folder, for a Space Ranger HD run folder, its ``outs``, its
    ``binned_outputs`` or one ``square_XXXum`` folder itself; :class:`FileNotFoundError` when there is none."""
    folder = Path(folder)
    if BIN_FOLDER.fullmatch(folder.name) and folder.is_dir():
        return {int(BIN_FOLDER.fullmatch(folder.name).group(1)): folder}
    for root in (folder, folder / "binned_outputs", folder / "outs" / "binned_outputs"):
        bins = {int(m.group(1)): p for p in sorted(root.glob("square_*um")) if p.is_dir()
                and (m := BIN_FOLDER.fullmatch(p.name))}
        if bins:
            return bins
    raise FileNotFoundError(f"{folder}: not a Visium HD output folder (no binned_outputs/square_XXXum here, in "
                            "outs/, or as this folder)")


def pick_bin(bins: dict[int, Path], bin_um: int | str | None, folder: Path) -> int:
    """``bin_um`` when that bin exists, else (None) ``DEFAULT_BIN_UM`` when present, else the bin closest to it."""
    if bin_um is None:
        return min(bins, key=lambda b: (abs(np.log(b / DEFAULT_BIN_UM)), -b))
    try:
        bin_um = int(bin_um)
    except (TypeError, ValueError):
        raise InputError(f"{folder}: bin_um (--bin-um) must be a whole number of µm, got {bin_um!r}") from None
    if bin_um not in bins:
        raise InputError(f"{folder}: no square_{int(bin_um):03d}um bins for bin_um={bin_um} (--bin-um); this run "
                         f"has {', '.join(f'{b} µm' for b in sorted(bins))}")
    return int(bin_um)


def read_positions_parquet(path: Path) -> Any:
    """``tissue_positions.parquet`` as a table indexed by barcode: ``in_tissue`` (bool), full-res ``x``, ``y``,
    ``array_row``, ``array_col``; :class:`CoordinateError` naming the file on a bad table."""
    import pandas as pd

    require_path(path, "Visium HD tissue positions file", missing="is missing")
    try:
        table = pd.read_parquet(path)
    except ImportError as exc:
        raise MissingDependencyError(f"{path}: {MISSING_PYARROW}") from exc
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise CoordinateError(f"{path}: cannot read the parquet tissue positions: {exc}") from exc
    if "barcode" not in table.columns and table.index.name == "barcode":
        table = table.reset_index()
    missing = [c for c in POSITION_COLUMNS if c not in table.columns]
    if missing:
        raise CoordinateError(f"{path}: tissue positions lack columns {missing} (has {list(table.columns)})")
    return positions_frame(table, path)


def _hd_candidates(scalefactors: dict, positions: Any, bin_um: int, scale: float, where: Path,
                   positions_path: Path, slide: Any | None, max_rows: int = 200_000) -> dict[str, PixelSizeCandidate]:
    """Pixel-size sources in µm per px of the image used (full-res pixels times ``scale``): 10x's
    ``microns_per_pixel``, the square bin grid (``bin_um`` pitch) fitted on every position of the file (up to
    ``max_rows`` evenly spaced), the bin width ``spot_diameter_fullres``, and the image metadata (full-res only)."""
    def from_scalefactors() -> tuple[float, str]:
        if "microns_per_pixel" not in scalefactors:
            raise PixelSizeError(f"no microns_per_pixel in {where}")
        mpp = check_um_per_px(scalefactors["microns_per_pixel"], what=f"{where} microns_per_pixel")
        return mpp / scale, f"Visium HD microns_per_pixel ({mpp:.5g} µm per full-res px, {where})"

    rows = positions.iloc[np.linspace(0, len(positions) - 1, min(len(positions), max_rows)).astype(int)]
    diameter = scalefactors.get("spot_diameter_fullres")
    out = {"scalefactors": from_scalefactors,
           "grid": grid_candidate(rows["array_row"].to_numpy(), rows["array_col"].to_numpy(),
                                  rows[["x", "y"]].to_numpy(np.float64) * scale, pitch_um=float(bin_um),
                                  packing="square", where=str(positions_path)),
           "spot-diameter": spot_diameter_candidate(
               float(diameter) * scale if isinstance(diameter, (int, float)) else None,
               float(scalefactors.get("bin_size_um", bin_um)), where, label="Visium HD bin width")}
    if slide is not None:
        out["metadata"] = metadata_candidate(slide)
    return out


def _run_name(bin_dir: Path) -> str:
    """The Space Ranger run folder's name (``RUN/outs/binned_outputs/square_XXXum``), else the bin's parent's."""
    root = bin_dir.parent
    if root.name == "binned_outputs":
        root = root.parent.parent if root.parent.name == "outs" else root.parent
    return root.resolve().name


def read_visium_hd(folder: str | os.PathLike, *, bin_um: int | None = None, image: str | os.PathLike | None = None,
                   slide_id: str | None = None, um_per_px: float | None = None, pixel_size_from: str = "auto",
                   crop_um: float = CropSpec.niche_um, make_unique: bool = False, var_names: str = "gene_symbols",
                   tissue_from: str = "in_tissue") -> SlideSample:
    """In-tissue bins of one Visium HD bin size (``bin_um``; default 16 µm when present) with the full-res
    ``image`` (the microscope image given to Space Ranger), else the bin folder's hires PNG (lowres when the hires
    one is missing or blank), coordinates scaled by its scale factor.

    Pixel size: ``um_per_px`` > ``pixel_size_from`` in :data:`HD_PIXEL_SIZE_CHOICES`; ``"auto"`` takes 10x's
    ``microns_per_pixel`` ("scalefactors"), else the square bin grid fitted on ``array_row``/``array_col``
    ("grid", ``bin_um`` apart), else ``bin_size_um / spot_diameter_fullres`` ("spot-diameter"), else the image
    metadata; every available one is kept in ``pixel_size_sources`` and a warning names two that differ by more
    than 5% (:func:`stalign.data.pixel_size.settle_pixel_size`). ``tissue_from="in_tissue"`` (default) trusts
    Space Ranger's in-tissue call; ``"image"`` lets prep's tissue mask drop bins too.
    """
    folder = Path(folder)
    if pixel_size_from not in HD_PIXEL_SIZE_CHOICES:
        raise PixelSizeError(f"{folder}: pixel_size_from={pixel_size_from!r} is not available for Visium HD; "
                             f"choose from {list(HD_PIXEL_SIZE_CHOICES)}")
    bins = find_bins(folder)
    chosen = pick_bin(bins, bin_um, folder)
    bin_dir = bins[chosen]
    matrix_path, spatial = bin_dir / "filtered_feature_bc_matrix.h5", bin_dir / "spatial"
    positions_path, sf_path = spatial / "tissue_positions.parquet", spatial / "scalefactors_json.json"
    require_path(matrix_path, "Visium HD count matrix", missing="is missing")
    scalefactors = read_scalefactors(sf_path)
    positions = read_positions_parquet(positions_path)
    adata, pos = in_tissue_rows(read_10x_h5(matrix_path, var_names=var_names), positions, matrix_path,
                                positions_path, unit="bins", warn_absent=False)
    image_path, scale, scale_note = spaceranger_image(image, spatial, scalefactors, sf_path)
    coords = pos[["x", "y"]].to_numpy(np.float64) * scale
    for key in ("array_row", "array_col"):
        adata.obs[key] = np.nan_to_num(pos[key].to_numpy(), nan=-1).astype(np.int64)
    adata.obsm["spatial"] = coords
    with open_slide(image_path) as slide:
        candidates = _hd_candidates(scalefactors, positions, chosen, scale, sf_path, positions_path,
                                    slide if image is not None else None)
        px = settle_pixel_size(what=f"{bin_dir} ({chosen} µm bins)", um_per_px=um_per_px,
                               pixel_size_from=pixel_size_from, candidates=candidates, auto_order=list(candidates))
        dims = slide.dimensions
    adata.uns["visium_hd"] = {"bin_um": chosen, "bins_available": sorted(bins), "default_bin": bin_um is None}
    sample = SlideSample(slide_id=slide_id or f"{_run_name(bin_dir)}_{chosen:03d}um", image_path=image_path,
                         adata=adata, coords_px=coords, um_per_px=px.um_per_px, pixel_size_source=px.source,
                         pixel_size_sources=px.sources,
                         source_files=[matrix_path, positions_path, sf_path, image_path], tissue_from=tissue_from)
    return check_sample(sample, image_dims=dims, crop_um=crop_um, make_unique=make_unique,
                        expression_file=str(matrix_path), coords_file=f"{positions_path} (scaled {scale_note})")
