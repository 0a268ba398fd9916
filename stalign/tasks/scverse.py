"""Outputs that scanpy and squidpy plot unchanged: ``obsm['spatial']`` in full-resolution pixels plus
``uns['spatial'][library_id]`` with ``images`` (``hires`` and ``lowres`` thumbnails of the slide) and
``scalefactors`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``, ``spot_diameter_fullres``), the layout of
``scanpy.read_visium``; and ``uns['stalign']`` saying what X holds."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

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
