"""Which spots of a slide ``prepare`` keeps, and why each dropped one was dropped.

Rules (``tissue_from``): ``"in_tissue"`` trusts Space Ranger's own call, which the reader offers for Space Ranger
folders (``read_spaceranger``) and HEST samples whose ``obs`` carries ``in_tissue`` (:func:`offer_in_tissue`);
``"image"`` keeps spots whose spot crop is at least ``min_fraction`` tissue on the image mask
(``stalign.data.tissue``); ``"auto"`` (default) is the first where the slide has Space Ranger's call, else the
second. The image mask is made for every slide (the QC picture draws it), whatever the rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stalign.data.errors import DataPrepError
from stalign.data.tissue import MaskInfo, tissue_fraction, tissue_mask_info

TISSUE_FROM = ("auto", "in_tissue", "image")
#: A spot is kept by the image mask when at least this fraction of its spot crop is tissue.
MIN_TISSUE_FRACTION = 0.5
IN_TISSUE_TRUE = {"1", "true", "yes"}
IN_TISSUE_FALSE = {"0", "false", "no"}


@dataclass(frozen=True)
class TissueRule:
    """How one slide's spots are filtered: ``rule`` "in_tissue", "image" or "none" (keep all), why, and for
    "in_tissue" Space Ranger's call per spot."""

    rule: str
    why: str
    in_tissue: np.ndarray | None = None

    def label(self) -> str:
        return {"in_tissue": "Space Ranger's in_tissue", "image": "the image tissue mask",
                "none": "none, every spot kept"}[self.rule]


def offer_in_tissue(sample: Any) -> Any:
    """Mark ``sample`` as carrying Space Ranger's call when its ``obs`` has an ``in_tissue`` column (a HEST sample;
    ``read_spaceranger`` marks its own, ``read_hest`` calls this); returns it."""
    if "in_tissue" in getattr(sample.adata, "obs", {}):
        sample.tissue_from = "in_tissue"
    return sample


def _in_tissue_values(sample: Any) -> np.ndarray:
    """(N,) bool from ``obs['in_tissue']`` (bool, 0/1, or 'true'/'false' text); one error naming a bad value."""
    col = sample.adata.obs["in_tissue"]
    values = np.asarray(col)
    if values.dtype.kind == "b":
        return values.astype(bool)
    if values.dtype.kind in "iuf" and np.isin(values, (0, 1)).all():
        return values == 1
    text = np.array([str(v).strip().lower() for v in values])
    bad = ~np.isin(text, list(IN_TISSUE_TRUE | IN_TISSUE_FALSE))
    if bad.any():
        where = next((str(f) for f in getattr(sample, "source_files", []) if str(f).endswith(".h5ad")), "obs")
        raise DataPrepError(f"slide {sample.slide_id} ({where}): obs['in_tissue'] must be 0/1 or true/false, "
                            f"got {values[bad][0]!r} for spot {sample.adata.obs_names[bad][0]!r}")
    return np.isin(text, list(IN_TISSUE_TRUE))


def tissue_rule(sample: Any, tissue_from: str = "auto", *, tissue_filter: bool = True) -> TissueRule:
    """The rule ``prepare`` applies to ``sample`` for ``tissue_from`` (see the module docstring)."""
    if tissue_from not in TISSUE_FROM:
        raise DataPrepError(f"tissue_from must be one of {list(TISSUE_FROM)}, got {tissue_from!r}")
    if not tissue_filter:
        return TissueRule("none", "--no-tissue-filter")
    has_call = getattr(sample, "tissue_from", "image") == "in_tissue" and "in_tissue" in sample.adata.obs
    if tissue_from == "image":
        return TissueRule("image", "--tissue-from image")
    if has_call:
        why = "--tissue-from in_tissue" if tissue_from == "in_tissue" else \
            "--tissue-from auto: the slide has Space Ranger's call"
        return TissueRule("in_tissue", why, in_tissue=_in_tissue_values(sample))
    if tissue_from == "in_tissue":
        raise DataPrepError(f"slide {sample.slide_id} ({sample.image_path}): --tissue-from in_tissue needs Space "
                            "Ranger's in_tissue call, which only Space Ranger folders and HEST samples with "
                            "obs['in_tissue'] carry; use --tissue-from auto or image")
    return TissueRule("image", "--tissue-from auto: no Space Ranger in_tissue call for this slide")


@dataclass
class TissueCall:
    """One slide's spots after its rule: ``keep``, the tissue fraction of each spot crop on the image mask, the
    reason for each dropped spot ("" when kept), and the thumbnail and mask the QC picture draws."""

    rule: TissueRule
    keep: np.ndarray
    fraction: np.ndarray
    reasons: np.ndarray
    min_fraction: float
    window_um: float
    thumb: np.ndarray
    mask: np.ndarray
    downsample: float
    mask_info: MaskInfo
    dims: list[int]

    def dropped_by_reason(self) -> dict[str, int]:
        names, counts = np.unique(self.reasons[~self.keep].astype(str), return_counts=True)
        return {str(n): int(c) for n, c in zip(names, counts)}

    def mask_would_drop(self) -> int:
        """Kept spots whose crop the image mask calls less than ``min_fraction`` tissue (a rule other than the
        mask disagreeing with it)."""
        return int((self.keep & (self.fraction < self.min_fraction)).sum())

    def record(self) -> dict[str, Any]:
        """The manifest's ``tissue`` record of the slide (the QC paths are added by the caller)."""
        return {"rule": self.rule.rule, "why": self.rule.why, "n_kept": int(self.keep.sum()),
                "n_dropped": int((~self.keep).sum()), "dropped_by_reason": self.dropped_by_reason(),
                "min_tissue_fraction": self.min_fraction, "spot_crop_um": self.window_um,
                "mask": self.mask_info.to_dict(), "mask_would_drop_kept": self.mask_would_drop()}

    def describe(self) -> str:
        """One line: the rule, why, and what it dropped."""
        n, kept = len(self.keep), int(self.keep.sum())
        text = f"tissue rule {self.rule.label()} ({self.rule.why}): kept {kept} of {n}"
        parts = []
        for reason, count in self.dropped_by_reason().items():
            f = self.fraction[~self.keep & (self.reasons == reason)]
            span = f", fractions {f.min():.2f}-{f.max():.2f}" if self.rule.rule == "image" and f.max() > 0 else ""
            parts.append(f"{count} ({reason}{span})")
        if parts:
            text += "; dropped " + ", ".join(parts)
        if self.rule.rule != "image" and self.mask_would_drop():
            text += f"; the image mask would also have dropped {self.mask_would_drop()} of the kept spots"
        return text


def _image_reasons(fraction: np.ndarray, min_fraction: float, window_um: float) -> np.ndarray:
    """The reason of each spot the mask drops: no tissue at all in its crop, or too little (the exact fraction is
    in ``TissueCall.fraction`` and the dropped-spot table)."""
    crop = f"the {window_um:g} µm spot crop"
    return np.where(fraction == 0, f"no tissue in {crop}", f"tissue fraction < {min_fraction:g} in {crop}")


def call_tissue(image_path: str, um_per_px: float, coords_px: np.ndarray, rule: TissueRule, window_um: float, *,
                min_fraction: float = MIN_TISSUE_FRACTION, thumb_size: int = 1024) -> TissueCall:
    """Apply ``rule`` to a slide's spots; the image mask is made on a ``thumb_size`` thumbnail and each spot's
    tissue fraction measured over its ``window_um`` spot crop (at least 3x3 thumbnail pixels). The first step of
    writing a slide's shard, run in the crop pool for the next slide while the parent writes this one."""
    from stalign.data.slide import open_slide

    coords = np.asarray(coords_px, dtype=np.float64).reshape(-1, 2)
    with open_slide(image_path, um_per_px=um_per_px) as slide:
        slide.set_tile_cache(0)  # one pass over a thumbnail level: a cache would only hold ~32 MiB meanwhile
        thumb, ds = slide.thumbnail(thumb_size)
        dims = list(slide.dimensions)
    mask, info = tissue_mask_info(thumb)
    radius = max(1.0, window_um / um_per_px / ds / 2)
    fraction = tissue_fraction(mask, coords / ds, radius=radius)
    reasons = np.full(len(coords), "", dtype=object)
    if rule.rule == "image":
        keep = fraction >= min_fraction
        reasons[~keep] = _image_reasons(fraction[~keep], min_fraction, window_um)
    elif rule.rule == "in_tissue":
        keep = np.asarray(rule.in_tissue, dtype=bool)
        if keep.shape != (len(coords),):
            raise ValueError(f"in_tissue has {keep.shape} values for {len(coords)} spots")
        reasons[~keep] = "in_tissue=0 in Space Ranger's call"
    else:
        keep = np.ones(len(coords), dtype=bool)
    return TissueCall(rule=rule, keep=keep, fraction=fraction, reasons=reasons, min_fraction=min_fraction,
                      window_um=float(window_um), thumb=thumb, mask=mask, downsample=float(ds), mask_info=info,
                      dims=dims)
