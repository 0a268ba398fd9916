"""``stalign bench``: the HEST-Benchmark protocol on prepared shards for any image encoder spec.

Encoder specs: ``model:CKPT`` (our aligned image embedding, ``encode_image`` of spot + niche crops),
``backbone:CKPT`` (the checkpoint's trained spot-image trunk, before tokens/projection), ``random:SPEC``
(the architecture of SPEC, randomly initialised, seeded), or any image-encoder spec with its pretrained weights
(e.g. ``efficientnet-lite0`` = ImageNet). Non-model encoders see the shards' spot crop (their crop spec; 112 µm by default, as HEST).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from stofm.util.errors import InputError


def _patch_batches(root: str | os.PathLike, batch_size: int, workers: int):
    import torch

    from stalign.data.dataset import ShardDataset, collate

    ds = ShardDataset(root)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate)


def encoder_features(spec: str, root: str | os.PathLike, *, batch_size: int = 32, workers: int = 0,
                     device: str | None = None, seed: int = 0, progress: bool = True,
                     arch: str | None = None) -> np.ndarray:
    """(N, F) features of every shard spot (manifest order) for one encoder spec (``arch``: the architecture of a
    bare local weights file)."""
    import torch
    from tqdm import tqdm

    import stalign
    from stalign.models.image_encoders import create_image_encoder
    from stalign.tasks.embed import default_device, embed_shards

    device = default_device(device)
    kind, _, rest = spec.partition(":")
    if kind == "model":
        return embed_shards(stalign.load_checkpoint(rest), root, gene=False, batch_size=batch_size,
                            workers=workers, device=device, progress=progress)["image"]
    if kind == "backbone":
        net = stalign.load_checkpoint(rest).spot_image_encoder
    elif kind == "random":
        torch.manual_seed(seed)
        net = create_image_encoder(rest, pretrained=False)
    else:
        net = create_image_encoder(spec, pretrained=True, arch=arch)
    net = net.to(device).eval()
    out = []
    with torch.inference_mode():
        for batch in tqdm(_patch_batches(root, batch_size, workers), desc=f"features {spec}", disable=not progress):
            out.append(net(batch["spot_image"].to(device)).float().cpu().numpy())
    return np.concatenate(out)


def bench_shards(root: str | os.PathLike, encoders: Sequence[str], *, by: str = "slide", n_splits: int | None = None,
                 k_genes: int | None = 50, latent_dim: int = 256, batch_size: int = 32, workers: int = 0,
                 device: str | None = None, seed: int = 0, progress: bool = True,
                 features: dict[str, np.ndarray] | None = None, arch: str | None = None):
    """HEST protocol table (pandas) for ``encoders`` on the shards under ``root`` (``arch``: the architecture of
    encoders given as bare local weight files).

    ``by="slide"``: folds by slide (leave-one-slide-out unless ``n_splits``), the HEST protocol; ``by="spot"``:
    shuffled spot-level ``n_splits``-fold (default 5) within slides, for a single slide (not HEST: neighbouring
    spots share tissue). ``features`` adds precomputed (N, F) arrays by name.
    """
    from stalign.data.dataset import ShardDataset
    from stalign.tasks.hest import hest_benchmark

    ds = ShardDataset(root)
    expr = ds.expression_matrix()
    slides = np.asarray(ds.slide_ids)[[ds.slide_of(i) for i in range(len(ds))]]
    if by == "slide":
        if len(set(slides.tolist())) < 2:
            raise InputError(f"{root}: one slide only; the HEST protocol splits by slide/patient. Prepare more "
                             f"slides, or use by='spot' (stalign bench --by spot) for a within-slide estimate")
        groups: Any = slides
    elif by == "spot":
        groups = np.random.default_rng(seed).permutation(len(ds))
        n_splits = n_splits or 5
    else:
        raise InputError(f"by must be 'slide' or 'spot', got {by!r}")
    feats = dict(features or {})
    failed: dict[str, str] = {}
    for spec in encoders:  # one failing encoder does not throw away the others' (often long) feature runs
        try:
            feats[spec] = encoder_features(spec, root, batch_size=batch_size, workers=workers, device=device,
                                           seed=seed, progress=progress, arch=arch)
        except (ValueError, OSError, RuntimeError, ImportError) as err:
            failed[spec] = " ".join(str(err).split())
    if not feats:
        raise InputError("no encoder could be benchmarked: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
                         if failed else "no encoders to benchmark")
    log1p = ds.manifest.get("expression") not in ("log1p_cp10k", "as_given")
    table = hest_benchmark(feats, expr, ds.genes, groups, n_splits=n_splits, k_genes=k_genes, log1p=log1p,
                           latent_dim=latent_dim, seed=seed, task=os.path.basename(os.path.normpath(root)))
    table.attrs.update({"by": by, "n_spots": len(ds), "n_slides": len(set(slides.tolist())), "failed": failed})
    return table


def format_table(table: Any) -> str:
    """The table as users compare it with the HEST leaderboard: Pearson mean ± std, pooled r, MSE, MAE."""
    lines = [f"{'task':16s} {'encoder':34s} {'pearson':>17s} {'pooled r':>9s} {'MSE':>8s} {'MAE':>7s} {'folds':>5s}"]
    for _, r in table.iterrows():
        lines.append(f"{str(r['task'])[:16]:16s} {str(r['encoder'])[:34]:34s} "
                     f"{r['pearson_mean']:8.3f} ± {r['pearson_std']:6.3f} {r['pooled_pearson_mean']:9.3f} "
                     f"{r['mse']:8.3f} {r['mae']:7.3f} {int(r['n_folds']):5d}")
    return "\n".join(lines)


def heldout_table(model: Any, root: str | os.PathLike, *, train: Sequence[int], test: Sequence[int], k: int = 10,
                  temperature: float = 0.05, image_spec: str | None = "efficientnet-lite0", latent_dim: int = 256,
                  batch_size: int = 32, workers: int = 0, device: str | None = None, progress: bool = True):
    """Pearson r per gene (mean ± std over genes), MSE and MAE on held-out shard spots ``test`` for: zero-shot
    retrieval from a bank of the ``train`` spots, a few-shot ridge probe on the model's embeddings, the mean
    expression, the average of the 6 nearest training spots (no image) and ``image_spec`` features + ridge."""
    import pandas as pd

    from stalign.tasks.baselines import (
        mean_predictor,
        neighbour_predictor,
        ridge_predictor,
    )
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.hest import pearson_per_gene
    from stalign.tasks.retrieval import ReferenceBank

    train, test = np.asarray(train, np.int64), np.asarray(test, np.int64)
    if len(np.intersect1d(train, test)):
        raise ValueError("train and test spots overlap")
    emb = embed_shards(model, root, batch_size=batch_size, workers=workers, device=device, progress=progress)
    y = emb["expression"].astype(np.float64)
    bank = ReferenceBank(embeddings=emb["gene"][train], expression=y[train], genes=emb["genes"])
    predictions = {
        f"zero-shot retrieval (k={k})": bank.predict(emb["image"][test], k=min(k, len(train)),
                                                     temperature=temperature),
        "few-shot ridge on stalign embeddings": ridge_predictor(emb["image"], y, latent_dim=latent_dim,
                                                                fit_intercept=True)(train, test),
        "mean expression": mean_predictor(y)(train, test),
        "neighbour average (6 nearest, no image)": neighbour_predictor(emb["coords_um"], y)(train, test),
    }
    if image_spec:
        feats = encoder_features(image_spec, root, batch_size=batch_size, workers=workers, device=device,
                                 progress=progress)
        predictions[f"{image_spec} features + ridge"] = ridge_predictor(feats, y, latent_dim=latent_dim,
                                                                        fit_intercept=True)(train, test)
    rows = []
    for name, pred in predictions.items():
        r = pearson_per_gene(y[test], pred)
        rows.append({"method": name, "pearson_mean": float(np.nanmean(r)) if np.isfinite(r).any() else np.nan,
                     "pearson_std": float(np.nanstd(r)) if np.isfinite(r).any() else np.nan,
                     "mse": float(((pred - y[test]) ** 2).mean()), "mae": float(np.abs(pred - y[test]).mean()),
                     "n_test": len(test), "n_genes": y.shape[1]})
    return pd.DataFrame(rows)
