"""Outputs that scanpy and squidpy plot unchanged: ``obsm['spatial']`` in full-resolution pixels plus
``uns['spatial'][library_id]`` with ``images`` (``hires`` and ``lowres`` thumbnails of the slide) and
``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``), the layout of
``scanpy.read_visium``; and ``uns['stalign']`` saying what X holds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError

HIRES_PX, LOWRES_PX = 2000, 600  # Space Ranger's image sizes


def library_id_of(slide: Any) -> str:
    """The library id of a slide: its file name without the suffix(es)."""
    name = Path(str(getattr(slide, "path", slide))).name
    return name.split(".")[0] or "slide"


def add_spatial_images(adata: Any, slide: Any, *, spot_diameter_px: float, library_id: str | None = None,
                       hires_px: int = HIRES_PX, lowres_px: int = LOWRES_PX) -> str:
    """Put the slide's thumbnails and scale factors in ``adata.uns['spatial'][library_id]``; returns the id.

    ``slide`` is an opened ``stalign.data.slide.Slide``; ``spot_diameter_px`` in its level-0 pixels (what
    ``scanpy.pl.spatial`` draws as the spot size)."""
    from PIL import Image

    library_id = library_id or library_id_of(slide)
    hires, ds_hi = slide.thumbnail(hires_px)
    small = Image.fromarray(hires)  # the lowres image from the hires one: the slide is read once
    small.thumbnail((lowres_px, lowres_px), Image.Resampling.LANCZOS)
    lowres = np.asarray(small)
    ds_lo = ds_hi * hires.shape[1] / lowres.shape[1]
    adata.uns.setdefault("spatial", {})[library_id] = {
        "images": {"hires": np.ascontiguousarray(hires), "lowres": np.ascontiguousarray(lowres)},
        "scalefactors": {"tissue_hires_scalef": float(1.0 / ds_hi), "tissue_lowres_scalef": float(1.0 / ds_lo),
                         "spot_diameter_fullres": float(spot_diameter_px)},
        "metadata": {"source_image_path": str(getattr(slide, "path", "")), "um_per_px": getattr(slide, "um_per_px", None)},
    }
    return library_id


def carry_obs(adata: Any, source_obs: Any) -> None:
    """Copy the columns of ``source_obs`` (e.g. the obs of a ``--coords`` AnnData) into ``adata.obs`` by row;
    existing columns of ``adata`` are kept (a clash gets the prefix ``input_``)."""
    if source_obs is None or len(source_obs.columns) == 0:
        return
    if len(source_obs) != adata.n_obs:
        raise ValueError(f"{len(source_obs)} rows of obs to carry over for {adata.n_obs} spots")
    for col in source_obs.columns:
        dest = col if col not in adata.obs.columns else f"input_{col}"
        adata.obs[dest] = source_obs[col].to_numpy()


def drawn_spot_diameter_um(given: float | None, coords: np.ndarray | None, spot_um: float, um_per_px: float) -> float:
    """The drawn spot diameter in µm (see ``predict_slide``): ``given``, else the crop width for tiles (``coords``
    None), else 0.55 x the median nearest-neighbour distance of ``coords`` (level-0 px), at most ``spot_um``."""
    if given is not None:
        if not given > 0:
            raise InputError(f"spot_diameter_um must be > 0, got {given}")
        return float(given)
    if coords is None or len(coords) < 2:
        return float(spot_um)
    from stalign.tasks.heatmap_grid import spot_pitch

    pitch = spot_pitch(np.asarray(coords, np.float64) * um_per_px)
    return float(min(spot_um, 0.55 * pitch)) if pitch > 0 else float(spot_um)


def shard_anndata(root: str | Path, slide_id: str, *, image: str | Path, um_per_px: float, obs: Any = None,
                  spot_diameter_um: float | None = None) -> Any:
    """The spots ``stalign prep`` kept of one slide, scanpy-ready: X the shard's expression over the manifest's
    genes (its units: ``uns['stalign']['expression']``), obsm['spatial'] the centres in ``image``'s pixels,
    ``uns['spatial']`` its thumbnails (spots drawn ``spot_diameter_um`` wide, default 0.55 x their pitch), and
    the columns of ``obs`` (e.g. the reader's AnnData obs, indexed by barcode) for these spots, in shard order."""
    import anndata as ad
    import pandas as pd

    from stalign.data.shards import read_manifest, read_shard
    from stalign.data.slide import open_slide

    manifest = read_manifest(root)
    entry = next((s for s in manifest["slides"] if s["slide_id"] == slide_id), None)
    if entry is None:
        raise ValueError(f"{root}: no slide {slide_id!r} (slides: {[s['slide_id'] for s in manifest['slides']]})")
    shard = read_shard(Path(root) / entry["shard"])
    out = ad.AnnData(X=shard["expr"], obs=pd.DataFrame(index=pd.Index(shard["barcodes"], dtype=str)),
                     var=pd.DataFrame(index=pd.Index(manifest["genes"], dtype=str)),
                     obsm={"spatial": np.asarray(shard["coords_px"], np.float64)},
                     uns={"stalign": {"expression": manifest["expression"], "slide_id": slide_id,
                                      "um_per_px": float(um_per_px)}})
    if obs is not None:
        carry_obs(out, obs.loc[out.obs_names])
    diameter = drawn_spot_diameter_um(spot_diameter_um, out.obsm["spatial"], float(manifest["spot_um"]),
                                      float(um_per_px))
    add_spatial_images(out, open_slide(image, um_per_px=um_per_px), spot_diameter_px=diameter / float(um_per_px),
                       library_id=slide_id)
    return out
