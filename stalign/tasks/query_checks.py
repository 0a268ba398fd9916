"""Reference/query checks run before anything is embedded: the pixel sizes of query and reference, how far each
image is blown up to fill a crop, and how much of the model's gene panel the query measures. Each mismatch is a
:class:`QueryMismatchWarning` naming the numbers (a prediction still runs: the user decides)."""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec

#: query and reference pixel sizes further apart than this ratio are warned about
MAX_PIXEL_SIZE_RATIO = 1.5
#: a crop blown up more than this (patch_px / the crop's width in image pixels) is warned about
MAX_UPSAMPLING = 2.0
#: a query measuring less than this fraction of the model's panel is warned about
MIN_PANEL_OVERLAP = 0.5


class QueryMismatchWarning(UserWarning):
    """Query and reference (or model) differ in a way that makes predictions less trustworthy."""


@dataclass
class ReferenceSummary:
    """What the checks need of a reference, read without embedding: ``info`` (the crop spec and the rest of a
    bank's ``info``, or a shards folder's manifest; what ``settle_crop`` reads), the pixel size of each reference
    slide (None when not recorded), where it came from, and the bank itself when it was a saved bank (loaded)."""

    info: dict[str, Any]
    um_per_px: dict[str, float] | None
    where: str
    bank: Any = None


def open_reference(reference: Any) -> ReferenceSummary:
    """A :class:`ReferenceSummary` of a ``ReferenceBank``, a saved bank folder (loaded: no embedding) or a shards
    folder (its manifest). Anything else raises ``FileNotFoundError`` naming the path."""
    from stalign.tasks.retrieval import ReferenceBank

    if isinstance(reference, ReferenceBank):
        path = getattr(reference, "path", None)
        return ReferenceSummary(info=dict(reference.info), um_per_px=_recorded(reference.info),
                                where=f"reference bank {path}" if path else "the reference bank", bank=reference)
    path = Path(reference)
    if (path / "bank.json").is_file():
        return open_reference(ReferenceBank.load(path))
    if (path / "manifest.json").is_file():
        from stalign.data.shards import read_manifest

        manifest = read_manifest(path)
        sizes = {str(s["slide_id"]): float(s["um_per_px"]) for s in manifest.get("slides", [])
                 if s.get("um_per_px") is not None}
        return ReferenceSummary(info=dict(manifest, source=str(path.resolve())), um_per_px=sizes or None,
                                where=f"reference shards {path}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: reference (bank or shards folder) does not exist")
    raise FileNotFoundError(f"{path}: not a reference bank (bank.json) nor a shards folder (manifest.json)")


def _recorded(info: dict[str, Any]) -> dict[str, float] | None:
    sizes = info.get("um_per_px")
    if isinstance(sizes, dict) and sizes:
        return {str(k): float(v) for k, v in sizes.items()}
    return None


def upsampling(crop: CropSpec, um_per_px: float) -> tuple[float, float]:
    """(the spot crop's width in image pixels, how many times it is blown up to ``crop.patch_px``)."""
    native = float(crop.spot_um) / float(um_per_px)
    return native, float(crop.patch_px) / native


def check_query(reference: ReferenceSummary | None, *, crop: CropSpec, query_um_per_px: float, query: str,
                model_genes: Sequence[str], query_genes: Sequence[str] | None = None) -> list[str]:
    """Warn (:class:`QueryMismatchWarning`) when the query's pixel size is more than 1.5x from the reference's,
    when the query or a reference slide is blown up more than 2x to fill a crop, and when the query's expression
    (``query_genes``, its measured genes) covers under half of ``model_genes``; returns the messages."""
    notes = [*_query_upsampling(crop, float(query_um_per_px), query)]
    if reference is not None:
        notes += _reference_notes(reference, crop, float(query_um_per_px), query)
    if query_genes is not None:
        notes += _panel_overlap(model_genes, query_genes, query)
    for note in notes:
        warnings.warn(note, QueryMismatchWarning, stacklevel=3)
    return notes


def _query_upsampling(crop: CropSpec, mpp: float, query: str) -> list[str]:
    native, factor = upsampling(crop, mpp)
    if factor <= MAX_UPSAMPLING:
        return []
    return [f"query {query}: a {crop.spot_um:g} µm spot crop spans {native:.1f} px of the image at {mpp:.4g} µm/px "
            f"and is blown up {factor:.1f}x to {crop.patch_px} px (more than {MAX_UPSAMPLING:g}x): the image is too "
            "coarse for these crops (a Space Ranger hires/lowres PNG?); give the full-resolution image"]


def _reference_notes(ref: ReferenceSummary, crop: CropSpec, mpp: float, query: str) -> list[str]:
    if not ref.um_per_px:
        return [f"{ref.where} records no pixel size (a bank built before stalign recorded them, or by hand): the query's "
                f"{mpp:.4g} µm/px is not compared with the reference's, nor is the reference checked for upsampling"]
    notes = []
    sizes = np.array(list(ref.um_per_px.values()), np.float64)
    median = float(np.median(sizes))
    ratio = max(mpp / median, median / mpp)
    if ratio > MAX_PIXEL_SIZE_RATIO:
        spread = f"median of {len(sizes)} slides, {sizes.min():.4g}-{sizes.max():.4g}" if len(sizes) > 1 else \
            f"slide {next(iter(ref.um_per_px))}"
        notes.append(f"query {query} has {mpp:.4g} µm/px, {ref.where} {median:.4g} µm/px ({spread}): {ratio:.2f}x "
                     f"apart (more than {MAX_PIXEL_SIZE_RATIO:g}x); crops are cut at the same µm, but at different "
                     "image resolution (scan magnification or a rescaled image)")
    blown = {sid: upsampling(crop, v) for sid, v in ref.um_per_px.items() if upsampling(crop, v)[1] > MAX_UPSAMPLING}
    if blown:
        worst = sorted(blown.items(), key=lambda kv: -kv[1][1])[:3]
        listed = ", ".join(f"{sid} ({ref.um_per_px[sid]:.4g} µm/px: {n:.1f} px blown up {f:.1f}x)"
                           for sid, (n, f) in worst)
        notes.append(f"{ref.where}: {len(blown)} of {len(sizes)} slides had their {crop.spot_um:g} µm spot crops "
                     f"blown up more than {MAX_UPSAMPLING:g}x to {crop.patch_px} px, e.g. {listed}: the reference "
                     "was prepared from too coarse an image (a Space Ranger hires/lowres PNG?)")
    return notes


def _panel_overlap(model_genes: Sequence[str], query_genes: Sequence[str], query: str) -> list[str]:
    panel = [str(g) for g in model_genes]
    measured = {str(g) for g in query_genes}
    shared = sum(g in measured for g in panel)
    if not panel or shared / len(panel) >= MIN_PANEL_OVERLAP:
        return []
    lower = {g.lower() for g in measured}
    nocase = sum(g.lower() in lower for g in panel)
    hint = (f"; {nocase} match ignoring case: gene symbols of another species?" if nocase > shared else "")
    return [f"the expression of query {query} measures {shared} of the model's {len(panel)} panel genes "
            f"({100 * shared / len(panel):.0f}%, under {100 * MIN_PANEL_OVERLAP:.0f}%): the predictions of the other "
            f"{len(panel) - shared} cannot be checked against it{hint}"]

