"""``stalign bench --shards``: image encoders against no-image and colour baselines on the same leak-free folds.

Encoder specs: ``model:CKPT`` (our aligned image embedding, ``encode_image`` of spot + niche crops),
``backbone:CKPT`` (the checkpoint's trained spot-image trunk, before tokens/projection), ``random:SPEC``
(the architecture of SPEC, randomly initialised, seeded), or any image-encoder spec with its pretrained weights
(e.g. ``efficientnet-lite0`` = ImageNet). Non-model encoders see the shards' spot crop (their crop spec; 112 µm by
default, as HEST). The protocol (not HEST's leaderboard recipe, which ``--hest-bench`` runs): folds of
``stalign.tasks.bench_folds`` (by site/patient/slide, or spatial blocks within one slide), each fold's genes chosen on
its training spots, features -> StandardScaler -> PCA(latent_dim) -> Ridge with an intercept (in closed form, exact:
``RidgeProbe(solver="exact")``); Pearson r per gene
(mean over genes per fold, mean ± std over folds), MSE and MAE. Every table holds the baselines on the same folds:
the training-fold mean, the average of the nearest training spots of the same slide (no image) and colour
statistics + the same ridge; the baseline of lowest MSE is the row to beat.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError


class PatchEncoder:
    """One encoder spec as a function of patch batches (uint8 or [0, 1] float (B, 3, P, P)) -> (B, F) features.
    ``model:CKPT`` gives ``encode_image(spot, niche)`` when niche crops are given, else ``encode_spot_image``."""

    def __init__(self, spec: str, *, arch: str | None = None, seed: int = 0) -> None:
        import torch

        import stalign
        from stalign.models.image_encoders import create_image_encoder

        self.spec = spec
        kind, _, rest = spec.partition(":")
        self.aligned = kind == "model"
        check_encoder_specs([spec])
        if self.aligned:
            self.net = stalign.load_checkpoint(rest)
        elif kind == "backbone":
            self.net = stalign.load_checkpoint(rest).spot_image_encoder
        elif kind == "random":
            torch.manual_seed(seed)
            self.net = create_image_encoder(rest, pretrained=False)
        else:
            self.net = create_image_encoder(spec, pretrained=True, arch=arch)
        self.net.eval()

    def to(self, device: Any) -> PatchEncoder:
        self.net = self.net.to(device)
        return self

    def __call__(self, spot: Any, niche: Any = None) -> Any:
        if not self.aligned:
            return self.net(spot)
        return self.net.encode_spot_image(spot) if niche is None else self.net.encode_image(spot, niche)


def check_encoder_specs(specs: Sequence[str]) -> None:
    """Refuse, before any extraction, ``model:``/``backbone:`` specs whose checkpoint folder does not exist."""
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind in ("model", "backbone") and not rest.startswith("hf-hub:") and not Path(rest).exists():
            raise FileNotFoundError(f"{rest}: no such checkpoint (encoder {spec})")


def encoder_features(spec: str, root: str | os.PathLike, *, batch_size: int = 32, workers: int = 0,
                     device: str | None = None, seed: int = 0, progress: bool = True,
                     arch: str | None = None, cache: Any = True) -> np.ndarray:
    """(N, F) features of every shard spot (manifest order) for one encoder spec (``arch``: the architecture of a
    bare local weights file), each shard's read from the feature store when computed before (``cache``: on, off
    or a ``FeatureStore``; ``stalign.tasks.feature_store``)."""
    import torch
    from tqdm import tqdm

    import stalign
    from stalign.data.dataset import ShardDataset
    from stalign.models.perf import resolve_device
    from stalign.tasks.embed import embed_shards, shard_batches
    from stalign.tasks.feature_store import open_store, spec_identity, spec_weights_sha256

    device = resolve_device(device)
    if spec.startswith("model:"):
        return embed_shards(stalign.load_checkpoint(spec[6:]), root, gene=False, batch_size=batch_size,
                            workers=workers, device=device, progress=progress, cache=cache)["image"]
    check_encoder_specs([spec])
    store = open_store(root, cache)
    built: list[PatchEncoder] = []

    def encoder() -> PatchEncoder:  # built on the first store miss (or to hash it): a full hit builds nothing
        if not built:
            built.append(PatchEncoder(spec, arch=arch, seed=seed).to(device))
        return built[0]

    def compute(slide_id: str) -> dict[str, np.ndarray]:
        net, out = encoder(), []
        batches = shard_batches(ShardDataset(root, slides=[slide_id]), batch_size=batch_size, workers=workers)
        with torch.inference_mode():
            for batch in tqdm(batches, desc=f"features {spec}", disable=not progress):
                out.append(net(batch["spot_image"].to(device)).float().cpu().numpy())
        return {"features": np.concatenate(out)}

    seed_used = seed if spec.startswith("random:") else None
    weights = spec_weights_sha256(spec, arch=arch, seed=seed_used, build=lambda: encoder().net) if store.enabled \
        else "not stored"  # --no-cache: the identity keys nothing
    identity = spec_identity(spec, weights, device=device, arch=arch, seed=seed_used)
    return store.per_shard(identity, ["features"], list(store.entries), compute)["features"]


def shard_colour_features(root: str | os.PathLike, *, batch_size: int = 64, workers: int = 0,
                          cache: Any = True) -> np.ndarray:
    """(N, 31) colour statistics (``baselines.colour_features``) of every shard spot's crop, manifest order
    (through the feature store, as :func:`encoder_features`)."""
    from stalign.data.dataset import ShardDataset
    from stalign.tasks.baselines import colour_features
    from stalign.tasks.embed import shard_batches
    from stalign.tasks.feature_store import baseline_identity, open_store

    def compute(slide_id: str) -> dict[str, np.ndarray]:
        batches = shard_batches(ShardDataset(root, slides=[slide_id]), batch_size=batch_size, workers=workers)
        return {"features": np.concatenate([colour_features(b["spot_image"].permute(0, 2, 3, 1).numpy())
                                            for b in batches])}

    store = open_store(root, cache)
    return store.per_shard(baseline_identity("colour statistics"), ["features"], list(store.entries),
                           compute)["features"]


def score_methods(methods: Mapping[str, Callable[[np.ndarray], Any]], targets: np.ndarray, genes: Sequence[str],
                  splits: Sequence[tuple[np.ndarray, np.ndarray]], panels: Sequence[Sequence[str]]
                  ) -> dict[str, dict[str, float]]:
    """Per method (``factory(y) -> Predictor`` on the fold's targets ``y``): Pearson mean over genes per fold
    (mean, std over folds), MSE and MAE over the folds; each fold scored on its own gene panel."""
    import warnings

    from stalign.tasks.hest import cross_validate

    col = {g: j for j, g in enumerate(genes)}
    per: dict[str, dict[str, list[float]]] = {m: {"r": [], "mse": [], "mae": []} for m in methods}
    for (train, test), panel in zip(splits, panels):
        y = targets[:, [col[g] for g in panel]]
        for name, factory in methods.items():
            res = cross_validate(factory(y), y, [(train, test)], panel)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a constant prediction has no r (NaN)
                per[name]["r"].append(float(np.nanmean(res.fold_pearson)))
            per[name]["mse"].append(float(res.fold_mse.mean()))
            per[name]["mae"].append(float(res.fold_mae.mean()))
    out = {}
    for name, v in per.items():
        r = np.asarray(v["r"])
        ok = np.isfinite(r)
        out[name] = {"pearson_mean": float(r[ok].mean()) if ok.any() else np.nan,
                     "pearson_std": float(r[ok].std()) if ok.any() else np.nan,
                     "mse": float(np.mean(v["mse"])), "mae": float(np.mean(v["mae"])), "n_folds": len(splits)}
    return out


def bench_shards(root: str | os.PathLike, encoders: Sequence[str], *, by: str = "auto", n_splits: int | None = None,
                 k_genes: int | None = 50, latent_dim: int = 256, batch_size: int = 32, workers: int = 0,
                 device: str | None = None, seed: int = 0, progress: bool = True,
                 features: dict[str, np.ndarray] | None = None, arch: str | None = None,
                 patients: Mapping[str, str] | None = None, sites: Mapping[str, str] | None = None,
                 neighbours: int = 6, cache: bool = True):
    """The table (pandas) of ``encoders`` and the baselines on the shards under ``root`` (see module doc; ``by``,
    ``patients`` and ``sites``: ``stalign.tasks.bench_folds``; ``features`` adds precomputed (N, F) arrays by name).
    Folds, gene panels and checkpoint paths are checked before any feature is extracted. Features come from the
    feature store when an earlier run computed them (``cache=False``: computed again, nothing stored);
    ``table.attrs['feature_store']`` says what was reused and the store's size."""
    import pandas as pd

    from stalign.data.dataset import ShardDataset
    from stalign.tasks.baselines import mean_predictor, neighbour_predictor, ridge_predictor
    from stalign.tasks.bench_folds import bench_folds
    from stalign.tasks.feature_store import open_store

    ds = ShardDataset(root)
    expr = ds.expression_matrix().astype(np.float64)
    log1p = ds.manifest.get("expression") not in ("log1p_cp10k", "as_given")
    folds = bench_folds(ds, expr, by=by, n_splits=n_splits, seed=seed, patients=patients, sites=sites,
                        k_genes=k_genes, log1p=log1p, root=root)
    check_encoder_specs(encoders)
    targets = np.log1p(expr) if log1p else expr
    slides = ds.slide_numbers()
    coords = np.concatenate([ds.slide_spots(k)["coords_um"] for k in range(len(ds.slide_ids))])
    ridge = {"latent_dim": latent_dim, "fit_intercept": True, "seed": seed, "solver": "exact"}
    store = open_store(root, cache)
    colour = shard_colour_features(root, workers=workers, cache=store)
    methods: dict[str, tuple[str, Callable[[np.ndarray], Any]]] = {"mean expression (training folds)": (
        "baseline", mean_predictor)}
    if folds.scheme in ("block", "spot"):  # across slides no training spot lies on the test slide
        methods[f"neighbour average ({neighbours} nearest, no image)"] = (
            "baseline", lambda y: neighbour_predictor(coords, y, k=neighbours, groups=slides))
    methods["colour stats + ridge"] = ("baseline", lambda y: ridge_predictor(colour, y, **ridge))
    feats = dict(features or {})
    failed: dict[str, str] = {}
    for spec in encoders:  # one failing encoder does not throw away the others' (often long) feature runs
        try:
            feats[spec] = encoder_features(spec, root, batch_size=batch_size, workers=workers, device=device,
                                           seed=seed, progress=progress, arch=arch, cache=store)
        except (ValueError, OSError, RuntimeError, ImportError) as err:
            failed[spec] = " ".join(str(err).split())
    if not feats:
        raise InputError("no encoder could be benchmarked: " + "; ".join(f"{k}: {v}" for k, v in failed.items())
                         if failed else "no encoders to benchmark")
    for name, x in feats.items():
        if len(x) != len(ds):
            raise InputError(f"features {name!r} have {len(x)} rows, the shards {len(ds)} spots")
        methods[name] = ("encoder", lambda y, x=np.asarray(x): ridge_predictor(x, y, **ridge))
    scores = score_methods({m: f for m, (_, f) in methods.items()}, targets, ds.genes, folds.splits, folds.panels)
    task = os.path.basename(os.path.normpath(root))
    rows = [{"task": task, "encoder": m, "kind": kind, **scores[m], "n_genes": len(folds.panels[0]),
             "folds": folds.scheme, "leaky": folds.leaky} for m, (kind, _) in methods.items()]
    table = pd.DataFrame(rows)
    base = table[table["kind"] == "baseline"]
    table["to_beat"] = table.index == base["mse"].idxmin()
    genes = sorted({g for p in folds.panels for g in p}, key=list(ds.genes).index)
    table.attrs.update({"by": folds.scheme, "folds": folds.label, "leaky": folds.leaky, "n_spots": len(ds),
                        "n_slides": len(ds.slide_ids), "failed": failed, "genes": genes,
                        "feature_store": store.summary()})
    return table


def format_table(table: Any) -> str:
    """The table as printed: Pearson r (mean ± std over folds), MSE, MAE, the folds (LEAKY ones said so), the
    baseline to beat marked."""
    lines = [f"{'method':40s} {'kind':8s} {'folds':11s} {'pearson r':>15s} {'MSE':>8s} {'MAE':>7s} {'n':>3s}"]
    for _, r in table.iterrows():
        r_text = "(constant)" if not np.isfinite(r["pearson_mean"]) else \
            f"{r['pearson_mean']:6.3f} ± {r['pearson_std']:5.3f}"
        folds = f"{r['folds']}{' LEAKY' if r.get('leaky') else ''}"
        lines.append(f"{str(r['encoder'])[:40]:40s} {r['kind']:8s} {folds:11s} {r_text:>15s} {r['mse']:8.3f} "
                     f"{r['mae']:7.3f} {int(r['n_folds']):3d}{'  <- row to beat' if r.get('to_beat') else ''}")
    if "to_beat" in table and table["to_beat"].any():
        best = table[table["to_beat"]].iloc[0]
        enc = table[table["kind"] == "encoder"]
        beat = enc[(enc["mse"] < best["mse"]) & ~(enc["pearson_mean"] < best["pearson_mean"])]["encoder"].tolist()
        lines.append(f"row to beat: {best['encoder']} (the baseline of lowest MSE); encoders beating it on MSE and "
                     f"r: {', '.join(map(str, beat)) or 'none'}")
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
