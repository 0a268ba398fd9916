"""The crop spec: what defines every spot and niche crop the models see, and its one reader.

A :class:`CropSpec` (spot and niche widths in µm, the crops' size in px, the resampling filter) is written once by
``stalign prep`` into the shards' manifest, carried into every checkpoint trained on them, and into reference banks
and few-shot heads. Whoever cuts crops again (predict, retrieval, bench, banks) takes it from there, and a spec that
differs from the model's is named with both values (:func:`warn_if_differs`).

:func:`read_crop_pairs` is the one crop reader of prep and prediction: ``Slide.read_crops`` of a batch of centres
at the spec's two widths (the same pixels as ``Slide.read_crop`` one by one).
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from stalign.data.errors import DataPrepError
from stalign.data.slide import RESAMPLE_FILTERS
from stofm.util.limits import check_limit

#: Filter of a new prep: antialiased bilinear, measured 2.1x faster than Lanczos for a cosine of 0.994 between the
#: two filters' embeddings (docs/performance.md).
DEFAULT_RESAMPLE = "bilinear"
#: Filter of shards, banks and heads written before the filter was recorded.
LEGACY_RESAMPLE = "lanczos"


class CropSpecError(DataPrepError):
    """An invalid crop spec, or one that cannot be used with the crops it must match."""


class CropSpecWarning(UserWarning):
    """Crops are cut (or were cut) with another spec than the model's or the reference's."""


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """Spot crop ``spot_um`` wide and niche crop ``niche_um`` wide around the same centre, both resampled to
    ``patch_px`` px with ``resample`` (``"bilinear"`` or ``"lanczos"``)."""

    spot_um: float = 112.0
    niche_um: float = 336.0
    patch_px: int = 224
    resample: str = DEFAULT_RESAMPLE

    def __post_init__(self) -> None:
        try:
            spot, niche, px = float(self.spot_um), float(self.niche_um), int(self.patch_px)
        except (TypeError, ValueError):
            raise CropSpecError(f"crop sizes must be numbers, got {self._fields()}") from None
        if not (math.isfinite(spot) and math.isfinite(niche) and spot > 0 and niche > 0 and px >= 1
                and px == float(self.patch_px)):
            raise CropSpecError(f"spot_um and niche_um must be > 0 µm and patch_px a whole number >= 1, got "
                                f"{self._fields()}")
        check_limit("patch_px", px, f"patch_px {px}")  # sizes bounded before any crop is allocated
        check_limit("crop_um", max(spot, niche), f"crop width {max(spot, niche):g} µm")
        name = str(self.resample).lower()
        if name not in RESAMPLE_FILTERS:
            raise CropSpecError(f"resample must be one of {', '.join(RESAMPLE_FILTERS)}; got {self.resample!r}")
        for key, value in (("spot_um", spot), ("niche_um", niche), ("patch_px", px), ("resample", name)):
            object.__setattr__(self, key, value)

    def _fields(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        """The four settings as a JSON-ready dict (the keys of manifests, checkpoints, banks and heads)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> CropSpec | None:
        """The spec a manifest, checkpoint, bank or head records (None when it records no crop sizes); a record
        without a filter was cut with :data:`LEGACY_RESAMPLE`."""
        values = values or {}
        if not all(values.get(k) for k in ("spot_um", "niche_um", "patch_px")):
            return None
        return cls(spot_um=values["spot_um"], niche_um=values["niche_um"], patch_px=values["patch_px"],
                   resample=values.get("resample") or LEGACY_RESAMPLE)

    def with_overrides(self, **values: Any) -> CropSpec:
        """This spec with the given settings replaced (None values keep this spec's)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def pixels(self, um_per_px: float) -> tuple[float, float]:
        """(spot, niche) crop widths in level-0 px of a slide of ``um_per_px`` (bounded: ``crop_read_px``)."""
        spot, niche = self.spot_um / float(um_per_px), self.niche_um / float(um_per_px)
        check_limit("crop_read_px", max(spot, niche), f"a {max(self.spot_um, self.niche_um):g} µm crop at "
                    f"{float(um_per_px):g} µm/px ({max(spot, niche):,.0f} px wide)")
        return spot, niche

    def differences(self, other: CropSpec) -> list[str]:
        """The settings that differ, as ``name a vs b``."""
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def __str__(self) -> str:
        return f"spot {self.spot_um:g} µm / niche {self.niche_um:g} µm at {self.patch_px} px, {self.resample}"


def warn_if_differs(spec: CropSpec | None, what: str, reference: CropSpec | None, reference_what: str) -> bool:
    """Warn (:class:`CropSpecWarning`: "WHAT crops A, but REFERENCE_WHAT B (the differences)") when ``spec`` and
    ``reference`` differ; True if they do. Nothing when either is unknown."""
    if spec is None or reference is None or spec == reference:
        return False
    warnings.warn(f"{what} crops {spec}, but {reference_what} {reference} "
                  f"({'; '.join(spec.differences(reference))}): embeddings of other crops are not comparable",
                  CropSpecWarning, stacklevel=3)
    return True


def shard_crops(manifest: Mapping[str, Any], root: Any, model: Any,
                model_what: str = "the model was trained on") -> CropSpec | None:
    """The crop spec of the shards under ``root`` (their ``manifest``), warned about when ``model``'s differs."""
    crops = CropSpec.from_dict(manifest)
    warn_if_differs(crops, f"the shards under {root} hold", getattr(model, "crop_spec", None), model_what)
    return crops


def read_crop_pairs(slide: Any, centers: Any, spec: CropSpec, *,
                    out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Spot and niche crops of ``spec`` around ``centers`` ((N, 2) level-0 px) of ``slide`` (opened with its pixel
    size): ((N, P, P, 3) uint8 spot crops, the same for the niches, (N,) bool spot padded, (N,) bool niche
    padded). ``out`` ((2, N, P, P, 3) uint8, e.g. shared memory) receives the crops."""
    spot_px, niche_px = spec.pixels(slide.um_per_px)
    spot, pad_s = slide.read_crops(centers, spot_px, spec.patch_px, resample=spec.resample,
                                   out=None if out is None else out[0])
    niche, pad_n = slide.read_crops(centers, niche_px, spec.patch_px, resample=spec.resample,
                                    out=None if out is None else out[1])
    return spot, niche, pad_s, pad_n
