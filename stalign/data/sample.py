"""A slide with its spots (:class:`SlideSample`, what every reader returns) and the validation shared by all
readers: spots, coordinates, barcodes, gene names and expression values."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.errors import BarcodeError, CoordinateError, ExpressionError, GeneNameError, examples
from stalign.data.expression import check_values
from stofm.util.errors import InputError


@dataclass(kw_only=True)
class SlideSample:
    """One slide with its spots, ready for cropping."""

    slide_id: str
    image_path: Path
    adata: Any  # AnnData: obs_names = barcodes, var_names = genes, X as given
    coords_px: np.ndarray  # (N, 2) float64 spot centres (x, y) in level-0 px of image_path
    um_per_px: float
    pixel_size_source: str
    source_files: list[Path] = field(default_factory=list)
    tissue_from: str = "image"  # "image": prep's tissue mask decides; "in_tissue": the reader's spots are trusted
    #: every available pixel-size source's µm/px (e.g. "grid", "metadata", "spot-diameter", "pitch", "user flag")
    pixel_size_sources: dict[str, float] = field(default_factory=dict)
    #: spots dropped by ``check_sample`` for lying outside the image: {"count": n, "barcodes": [...]}
    dropped_out_of_image: dict[str, Any] = field(default_factory=lambda: {"count": 0, "barcodes": []})
    #: the slide's groups given with it (``GROUP_KEYS``: patient, site; e.g. columns of ``prep --samples``)
    groups: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tissue_from not in ("image", "in_tissue"):
            raise InputError(f"tissue_from must be 'image' or 'in_tissue', got {self.tissue_from!r}")

    @property
    def n_spots(self) -> int:
        return int(self.adata.n_obs)

    def pixel_size_record(self) -> dict[str, Any]:
        """``um_per_px``, ``pixel_size_source`` and ``pixel_size_sources`` (JSON-ready): what the manifest and a
        prediction record about the pixel size."""
        return {"um_per_px": float(self.um_per_px), "pixel_size_source": str(self.pixel_size_source),
                "pixel_size_sources": {str(k): float(v) for k, v in self.pixel_size_sources.items()}}


#: Slide-level groups that benchmarks hold out together (``stalign bench --by patient / site``).
GROUP_KEYS = ("patient", "site")


def slide_groups(sample: SlideSample) -> dict[str, str]:
    """The slide's patient and site (what prep writes into its manifest entry): those given with it
    (``sample.groups``), else an ``obs`` column ``patient`` / ``site`` holding one value for every spot (as synth
    v3 slides carry their site); a column with several values names no slide-level group and is left out."""
    out = {}
    obs = getattr(sample.adata, "obs", None)
    for key in GROUP_KEYS:
        if sample.groups.get(key):
            out[key] = str(sample.groups[key])
        elif obs is not None and key in obs.columns:
            values = obs[key].astype(str).unique()
            if len(values) == 1 and values[0] not in ("", "nan", "None"):
                out[key] = str(values[0])
    return out


def coords_from_obsm(adata: Any, key: str, *, what: str) -> np.ndarray:
    """(N, 2) float64 (x, y) from ``adata.obsm[key]``; :class:`CoordinateError` when missing or misshaped."""
    if key not in adata.obsm:
        raise CoordinateError(f"{what}: no obsm[{key!r}] with spot coordinates (obsm has {examples(adata.obsm)})")
    value = adata.obsm[key]
    value = value.to_numpy() if hasattr(value, "to_numpy") else np.asarray(value)
    try:
        coords = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CoordinateError(f"{what}: obsm[{key!r}] is not numeric: {exc}") from exc
    if coords.ndim != 2 or coords.shape[1] < 2:
        raise CoordinateError(f"{what}: obsm[{key!r}] must be (n_spots, 2) x/y pixels, got shape {coords.shape}")
    return np.ascontiguousarray(coords[:, :2])


def check_sample(sample: SlideSample, *, image_dims: tuple[int, int], crop_um: float, make_unique: bool,
                 expression_file: str, coords_file: str) -> SlideSample:
    """Raise a :class:`DataPrepError` naming the file on bad input; returns ``sample`` (genes made unique on request).

    Checks: at least one spot and one gene; unique barcodes; unique gene names (or ``make_unique``: anndata's
    ``var_names_make_unique``, which appends ``-1``, ``-2``...); finite, non-negative ``X`` (and
    ``layers['counts']``); finite coordinates. Spots whose ``crop_um`` crop misses the image are dropped (see
    :func:`_drop_out_of_image`).
    """
    adata, coords = sample.adata, sample.coords_px
    if adata.n_obs == 0:
        raise ExpressionError(f"{expression_file}: no spots (0 observations)")
    if adata.n_vars == 0:
        raise ExpressionError(f"{expression_file}: no genes (0 variables)")
    if len(coords) != adata.n_obs:
        raise CoordinateError(f"{coords_file}: {len(coords)} coordinates for {adata.n_obs} spots")
    barcodes = adata.obs_names
    if barcodes.has_duplicates:
        raise BarcodeError(f"{expression_file}: duplicated barcodes (obs_names), e.g. "
                           f"{examples(barcodes[barcodes.duplicated()].unique())}")
    genes = adata.var_names
    if genes.has_duplicates:
        if not make_unique:
            dups = genes[genes.duplicated()].unique()
            raise GeneNameError(f"{expression_file}: {len(dups)} duplicated gene names, e.g. {examples(dups)}; "
                                "pass make_unique=True (--make-unique-genes) to suffix them -1, -2, ...")
        adata.var_names_make_unique()
    check_values(adata.X, source=expression_file)
    if "counts" in adata.layers:
        check_values(adata.layers["counts"], source=f"{expression_file} layers['counts']")
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise CoordinateError(f"{coords_file}: {int(bad.sum())} spots have NaN/inf coordinates, e.g. barcodes "
                              f"{examples(barcodes[bad])}")
    _drop_out_of_image(sample, image_dims=image_dims, crop_um=crop_um, coords_file=coords_file)
    return sample


#: A slide is refused when fewer than this share of its spots lie on the image (the rest are dropped with a warning).
MIN_SPOTS_ON_IMAGE = 0.5


def _drop_out_of_image(sample: SlideSample, *, image_dims: tuple[int, int], crop_um: float, coords_file: str) -> None:
    """Drop the spots (coordinates and expression rows) lying more than half a ``crop_um`` crop outside the image,
    as HEST's patching does: a warning names the count and the first barcodes, ``sample.dropped_out_of_image``
    records them (prep writes it into the manifest). :class:`CoordinateError` when every spot lies outside (a wrong
    image or scale) or fewer than ``MIN_SPOTS_ON_IMAGE`` of them remain."""
    import warnings

    coords, barcodes = sample.coords_px, sample.adata.obs_names
    width, height = image_dims
    margin = crop_um / sample.um_per_px / 2
    outside = ((coords[:, 0] < -margin) | (coords[:, 1] < -margin)
               | (coords[:, 0] > width + margin) | (coords[:, 1] > height + margin))
    n_out, n = int(outside.sum()), len(coords)
    if not n_out:
        return
    place = (f"outside {sample.image_path} ({width}x{height} px, margin {margin:.0f} px = half a {crop_um:g} µm "
             f"crop), e.g. barcodes {examples(barcodes[outside])} at {coords[outside][:3].round(1).tolist()}")
    if n_out == n:
        raise CoordinateError(f"{coords_file}: all {n} spots lie {place}: the coordinates are for a different image "
                              "or scale (check the image and the pixel size)")
    if n - n_out < MIN_SPOTS_ON_IMAGE * n:
        raise CoordinateError(f"{coords_file}: {n_out} of {n} spots lie {place}; fewer than {MIN_SPOTS_ON_IMAGE:.0%} "
                              "would remain, so the slide is refused: are the coordinates for a different image or "
                              "scale?")
    warnings.warn(f"{coords_file}: dropped {n_out} of {n} spots that lie {place} (as HEST does); recorded in the "
                  "manifest as dropped_out_of_image", stacklevel=3)
    sample.dropped_out_of_image = {"count": n_out, "barcodes": [str(b) for b in barcodes[outside]]}
    sample.adata = sample.adata[~outside].copy()
    sample.coords_px = np.ascontiguousarray(coords[~outside])
