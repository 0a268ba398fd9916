"""Baselines for H&E -> expression, all run through the same folds as the HEST protocol: the training
mean, the average of the nearest spots (no image), colour statistics, and ImageNet features (ridge or kNN)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec
from stalign.data.errors import PixelSizeError
from stalign.tasks.ann_index import unit_rows
from stalign.tasks.hest import Predictor, cross_validate, group_splits, ridge_probe
from stofm.util.errors import InputError

#: The crops of the baseline figures in docs/tasks.md (measured before the default filter became bilinear).
LANCZOS_CROPS = CropSpec(resample="lanczos")


def top_variance_genes(expression: np.ndarray, genes: Sequence[str], k: int = 50) -> list[str]:
    """The ``k`` genes of largest variance (panel order)."""
    var = np.asarray(expression, np.float64).var(0)
    return [str(genes[i]) for i in np.sort(np.argsort(-var, kind="stable")[:k])]


def mean_predictor(y: np.ndarray) -> Predictor:
    """Predict the training mean for every test spot."""
    return lambda train, test: np.repeat(y[train].mean(0, keepdims=True), len(test), axis=0)


def neighbour_predictor(coords: np.ndarray, y: np.ndarray, *, k: int = 6,
                        groups: np.ndarray | None = None) -> Predictor:
    """Average expression of the ``k`` nearest training spots in space (no image); with ``groups`` (the slide of
    each spot) only training spots of the test spot's own slide count (a slide without any is refused)."""
    coords = np.asarray(coords, np.float64)
    groups = np.zeros(len(coords), np.int64) if groups is None else np.asarray(groups)

    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        out = np.empty((len(test), y.shape[1]))
        for g in np.unique(groups[test]):
            tr, te = train[groups[train] == g], test[groups[test] == g]
            if not len(tr):
                raise InputError(f"neighbour average: no training spot on the slide ({g}) of a test spot")
            d = np.linalg.norm(coords[te, None] - coords[None, tr], axis=-1)
            near = np.argsort(d, axis=1, kind="stable")[:, : min(k, len(tr))]
            out[groups[test] == g] = y[tr][near].mean(1)
        return out

    return predict


def ridge_predictor(x: np.ndarray, y: np.ndarray, **probe: Any) -> Predictor:
    """HEST's PCA + ridge probe on features ``x`` (``probe``: ``RidgeProbe``'s settings, e.g. ``fit_intercept``)."""
    return lambda train, test: ridge_probe(x[train], y[train], x[test], **probe)


def knn_predictor(x: np.ndarray, y: np.ndarray, *, k: int = 5) -> Predictor:
    """Mean expression of the ``k`` training spots whose standardised features are most cosine-similar."""
    def predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-8
        a, b = unit_rows((x[train] - mu) / sd, None), unit_rows((x[test] - mu) / sd, None)
        near = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, : min(k, len(train))]
        return y[train][near].mean(1)

    return predict


def colour_features(patches: np.ndarray) -> np.ndarray:
    """Colour statistics of RGB patches (N, H, W, 3), uint8 or float in [0, 1]: per channel mean, std, 10/50/90th
    percentiles in RGB and in optical density (haematoxylin/eosin absorb differently), plus the fraction of bright
    pixels."""
    x = np.asarray(patches, np.float32).reshape(len(patches), -1, 3)
    x = x / 255.0 if np.asarray(patches).dtype == np.uint8 else x
    od = -np.log(np.clip(x, 1 / 255, 1.0))
    feats = []
    for arr in (x, od):
        feats += [arr.mean(1), arr.std(1)] + [np.percentile(arr, q, axis=1) for q in (10, 50, 90)]
    feats.append((x.mean(2) > 0.85).mean(1, keepdims=True))
    return np.concatenate(feats, axis=1)


def image_features(patches: np.ndarray, *, spec: str = "efficientnet-lite0", pretrained: Any = True,
                   batch_size: int = 32,
                   device: str | None = None) -> np.ndarray:
    """Frozen features of an image encoder spec (``stalign.models.image_encoders``) for uint8 patches."""
    import torch

    from stalign.models.image_encoders import create_image_encoder
    from stalign.models.perf import resolve_device

    encoder = create_image_encoder(spec, pretrained=pretrained)
    device = resolve_device(device)
    encoder = encoder.to(device).eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(patches), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(patches[s:s + batch_size])).permute(0, 3, 1, 2)
            out.append(encoder(batch.to(device)).float().cpu().numpy())
    return np.concatenate(out)


def evaluation_splits(n: int, scheme: str, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Spot-level folds within one slide: ``"loo"`` (leave one spot out) or ``"<k>-fold"`` (shuffled)."""
    spots = np.arange(n)
    if scheme == "loo":
        return group_splits(spots)
    if scheme.endswith("-fold") and scheme[:-5].isdigit():
        return group_splits(spots, n_splits=int(scheme[:-5]), shuffle_seed=seed)
    raise InputError(f"unknown evaluation scheme {scheme!r}: use 'loo' or '<k>-fold'")


def run_baselines(predictors: Mapping[str, Callable[[np.ndarray], Predictor] | Predictor], y: np.ndarray,
                  genes: Sequence[str], *, schemes: Sequence[str] = ("loo", "5-fold"), seed: int = 0):
    """Evaluate each predictor under each scheme; a table (pandas): Pearson (per fold and pooled), MSE, MAE."""
    import pandas as pd

    rows = []
    for scheme in schemes:
        splits = evaluation_splits(len(y), scheme, seed=seed)
        for name, predict in predictors.items():
            summary = cross_validate(predict, y, splits, genes).summary()
            rows.append({"scheme": scheme, "method": name, **summary})
    return pd.DataFrame(rows)


def slide_baselines(adata: Any, slide: Any, *, crop: CropSpec = LANCZOS_CROPS, k_genes: int = 50,
                    image_specs: Sequence[str] = ("efficientnet-lite0",), schemes: Sequence[str] = ("loo", "5-fold"),
                    neighbours: int = 6, seed: int = 0):
    """All baselines on one slide's spots (``adata``: X log-normalised, obsm['spatial'] level-0 px; ``slide``
    from ``stalign.data.slide.open_slide`` with a pixel size): the top-``k_genes`` variance genes, the spot crops
    of ``crop`` (default 112 µm at 224 px, Lanczos, as the figures of docs/tasks.md). Returns the table of ``run_baselines`` with the settings in ``table.attrs``."""
    if slide.um_per_px is None:
        raise PixelSizeError(f"{slide.path}: no pixel size; open the slide with um_per_px=... to crop {crop.spot_um:g} µm")
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    genes = top_variance_genes(x, list(adata.var_names), k_genes)
    y = x[:, [list(adata.var_names).index(g) for g in genes]].astype(np.float64)
    coords = np.asarray(adata.obsm["spatial"], np.float64)
    patches, _ = slide.read_crops(coords, crop.pixels(slide.um_per_px)[0], crop.patch_px, resample=crop.resample)
    colour = colour_features(patches)
    predictors: dict[str, Predictor] = {"mean expression": mean_predictor(y),
                                        f"neighbour average ({neighbours} nearest, no image)":
                                            neighbour_predictor(coords, y, k=neighbours),
                                        "colour stats + ridge": ridge_predictor(colour, y),
                                        "colour stats + kNN": knn_predictor(colour, y)}
    for spec in image_specs:
        feats = image_features(patches, spec=spec)
        predictors[f"{spec} ImageNet + ridge"] = ridge_predictor(feats, y)
        predictors[f"{spec} ImageNet + kNN"] = knn_predictor(feats, y)
    table = run_baselines(predictors, y, genes, schemes=schemes, seed=seed)
    table.attrs.update({"genes": genes, "crop": crop.to_dict(), "um_per_px": slide.um_per_px,
                        "pixel_size_source": slide.pixel_size_source})
    return table
