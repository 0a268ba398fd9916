"""The crop spec: what defines every spot and niche crop the models see, and its one reader.

A :class:`CropSpec` (spot and niche widths in µm, the crops' size in px, the resampling filter) is written once by
``stalign prep`` into the shards' manifest, carried into every checkpoint trained on them, and into reference banks
and few-shot heads. Whoever cuts crops again (predict, retrieval, bench, banks) takes it from there, and a spec that
differs from the model's is named with both values (:func:`warn_if_differs`).

:func:`read_crop_pairs` is the one crop reader of prep and prediction: ``Slide.read_crops`` of a batch of centres
at the spec's two widths (the same pixels as ``Slide.read_crop`` one by one), stain-normalised when the spec says so
(``stain_norm="macenko"``, :mod:`stalign.data.stain`, to the target :func:`fit_stain_target` fitted on the prep's
slides), so prep and prediction see crops normalised alike.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from stalign.data.errors import DataPrepError
from stalign.data.slide import RESAMPLE_FILTERS
from stalign.data.stain import STAIN_METHODS, StainError, check_target, fit_target, normalize
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
    ``patch_px`` px with ``resample`` (``"bilinear"`` or ``"lanczos"``); ``stain_norm`` ``"none"`` or
    ``"macenko"``: every crop normalised to the target stain matrix ``stain_matrix`` (3 x 2, haematoxylin then eosin
    optical-density vectors) and 99th-percentile concentrations ``stain_max`` fitted on ``stain_target`` ("auto":
    all slides of the prep; else one slide id). A macenko spec without a matrix is fitted by the prep."""

    spot_um: float = 112.0
    niche_um: float = 336.0
    patch_px: int = 224
    resample: str = DEFAULT_RESAMPLE
    stain_norm: str = "none"
    stain_target: str | None = None
    stain_matrix: tuple[tuple[float, float], ...] | None = None
    stain_max: tuple[float, float] | None = None

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
        self._settle_stain()

    def _settle_stain(self) -> None:
        """Check the stain settings; store the target as tuples of floats (none: no target)."""
        method = str(self.stain_norm).lower()
        if method not in STAIN_METHODS:
            raise CropSpecError(f"stain_norm must be one of {', '.join(STAIN_METHODS)}; got {self.stain_norm!r}")
        object.__setattr__(self, "stain_norm", method)
        if method == "none":
            for key in ("stain_target", "stain_matrix", "stain_max"):
                object.__setattr__(self, key, None)
            return
        object.__setattr__(self, "stain_target", str(self.stain_target or "auto"))
        if (self.stain_matrix is None) != (self.stain_max is None):
            raise CropSpecError("stain_matrix and stain_max are given together (or neither, to fit them)")
        if self.stain_matrix is not None:
            try:
                he, mc = check_target(self.stain_matrix, self.stain_max)
            except StainError as err:
                raise CropSpecError(str(err)) from None
            object.__setattr__(self, "stain_matrix", tuple(tuple(float(v) for v in row) for row in he))
            object.__setattr__(self, "stain_max", tuple(float(v) for v in mc))

    def _fields(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (the keys of manifests, checkpoints, banks and heads); the stain keys
        only when the crops are normalised (records without them read as ``stain_norm="none"``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if self.stain_norm == "none":
            return {k: v for k, v in out.items() if not k.startswith("stain_")}
        out["stain_matrix"] = None if self.stain_matrix is None else [list(r) for r in self.stain_matrix]
        out["stain_max"] = None if self.stain_max is None else list(self.stain_max)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> CropSpec | None:
        """The spec a manifest, checkpoint, bank or head records (None when it records no crop sizes); a record
        without a filter was cut with :data:`LEGACY_RESAMPLE`."""
        values = values or {}
        if not all(values.get(k) for k in ("spot_um", "niche_um", "patch_px")):
            return None
        return cls(spot_um=values["spot_um"], niche_um=values["niche_um"], patch_px=values["patch_px"],
                   resample=values.get("resample") or LEGACY_RESAMPLE,
                   stain_norm=values.get("stain_norm") or "none", stain_target=values.get("stain_target"),
                   stain_matrix=values.get("stain_matrix"), stain_max=values.get("stain_max"))

    def with_overrides(self, **values: Any) -> CropSpec:
        """This spec with the given settings replaced (None values keep this spec's); another ``stain_norm`` or
        ``stain_target`` drops the fitted target (the prep fits it again)."""
        values = {k: v for k, v in values.items() if v is not None}
        new = dataclasses.replace(self, **values)
        if (new.stain_norm, new.stain_target) != (self.stain_norm, self.stain_target) \
                and "stain_matrix" not in values:
            new = dataclasses.replace(new, stain_matrix=None, stain_max=None)
        return new

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
        stain = "" if self.stain_norm == "none" else f", {self.stain_norm} stain normalisation ({self.stain_target})"
        return f"spot {self.spot_um:g} µm / niche {self.niche_um:g} µm at {self.patch_px} px, {self.resample}{stain}"


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
    if spec.stain_norm != "none" and spec.stain_matrix is None:
        raise CropSpecError(f"crops {spec}: the stain target is not fitted (stalign prep fits it on its slides)")
    spot_px, niche_px = spec.pixels(slide.um_per_px)
    spot, pad_s = slide.read_crops(centers, spot_px, spec.patch_px, resample=spec.resample,
                                   out=None if out is None else out[0])
    niche, pad_n = slide.read_crops(centers, niche_px, spec.patch_px, resample=spec.resample,
                                    out=None if out is None else out[1])
    if spec.stain_norm == "macenko":
        normalize(spot, spec.stain_matrix, spec.stain_max, out=spot)
        normalize(niche, spec.stain_matrix, spec.stain_max, out=niche)
    return spot, niche, pad_s, pad_n


def fit_stain_target(spec: CropSpec, samples: Sequence[Any], *, previous: CropSpec | None = None,
                     n_crops: int = 64, max_pixels: int = 2_000_000) -> CropSpec:
    """``spec`` with its stain target fitted (unchanged when it normalises nothing or has a target; ``previous``'s,
    e.g. the existing shards', when it asks for the same): Macenko's estimate on the spot crops (unnormalised) of
    up to ``n_crops`` evenly spaced spots of each slide of ``stain_target`` (``"auto"``: every ``samples`` slide;
    else the slide of that id), pooled as one image (at most ``max_pixels`` pixels, strided)."""
    from stalign.data.slide import open_slide

    if spec.stain_norm == "none" or spec.stain_matrix is not None:
        return spec
    if previous is not None and previous.stain_matrix is not None and \
            (previous.stain_norm, previous.stain_target) == (spec.stain_norm, spec.stain_target):
        return dataclasses.replace(spec, stain_matrix=previous.stain_matrix, stain_max=previous.stain_max)
    chosen = [s for s in samples if spec.stain_target in ("auto", s.slide_id)]
    if not chosen:
        raise CropSpecError(f"stain target {spec.stain_target!r} is none of this prep's slides "
                            f"({', '.join(s.slide_id for s in samples)}); use one of them or 'auto'")
    plain = dataclasses.replace(spec, stain_norm="none")
    pixels = []
    for s in chosen:
        pick = np.unique(np.linspace(0, len(s.coords_px) - 1, min(n_crops, len(s.coords_px))).round().astype(int))
        with open_slide(s.image_path, um_per_px=s.um_per_px) as slide:
            spot = read_crop_pairs(slide, s.coords_px[pick], plain)[0]
        pixels.append(spot.reshape(-1, 3))
    pooled = np.concatenate(pixels)
    pooled = pooled[:: max(1, math.ceil(len(pooled) / max_pixels))]
    try:
        matrix, max_conc = fit_target(pooled)
    except StainError as err:
        raise CropSpecError(f"stain target {spec.stain_target!r} ({', '.join(s.slide_id for s in chosen)}): "
                            f"{err}") from None
    return dataclasses.replace(spec, stain_matrix=matrix, stain_max=max_conc)
