"""The stages of ``make demo`` (``stalign demo``, see ``stalign.commands.demo``): the whole job end to end on real
data, each stage reading and extending one :class:`DemoContext`.

fetch: the real 10x Visium crop (49 spots). prep: shards of the crop and of a synthetic slide with a known
image<->expression link. train: the stalign-demo model on the synthetic slide, held-out retrieval recall next to
chance. evaluate: spatial folds of the real crop, one model per fold on its training spots only, a table of
held-out per-gene Pearson r / MSE (zero-shot retrieval, few-shot ridge, baselines). predict: held-out predictions
over the H&E with ``predict_slide`` and heat-map PNGs (predicted vs measured).

Each stage reads and extends one ``DemoContext`` (``ctx.data`` for paths and objects, ``ctx.rows`` for the
result tables).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError

SQUIDPY = "squidpy-visium-crop"


@dataclass(kw_only=True)
class DemoContext:
    """State shared by the stages: options, produced paths/objects, result rows and timings."""

    out: Path
    args: argparse.Namespace
    data: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # table name -> rows
    seconds: dict[str, float] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)  # table name -> lines printed under it


StageFn = Callable[[DemoContext], None]
STAGES: dict[str, StageFn] = {}


def stage(name: str) -> Callable[[StageFn], StageFn]:
    """Register a demo stage (run in registration order)."""
    def deco(fn: StageFn) -> StageFn:
        STAGES[name] = fn
        return fn
    return deco


@stage("fetch")
def fetch_stage(ctx: DemoContext) -> None:
    """Download (or reuse from the cache) the real Visium crop through the project's own fetcher."""
    from stalign.data.fetch import fetch

    folder = fetch(SQUIDPY)
    ctx.data["squidpy_dir"] = folder
    print(f"{SQUIDPY}: {folder}")
    for name in ("test_data.h5ad", "test_img.jpg"):
        print(f"  {name:16s} {(folder / name).stat().st_size / 1e6:6.2f} MB")


@stage("prep")
def prep_stage(ctx: DemoContext) -> None:
    """Shards for the real crop and for a synthetic slide (separate folders: their genes differ)."""
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import ensure_synthetic_slide

    a = ctx.args
    real = _real_sample(ctx)
    synth = ensure_synthetic_slide(ctx.out / "synthetic", n_spots=a.synth_spots, um_per_px=a.synth_um_per_px,
                                   seed=0, progress=not a.quiet)
    fake = read_anndata_image(synth.paths["adata"], synth.paths["image"], slide_id=synth.slide_id)
    ctx.data["synthetic_slide"] = synth
    alt = "spot-diameter" if a.pixel_size_from == "pitch" else "pitch"
    other = read_anndata_image(real.adata, real.image_path, slide_id=real.slide_id, pixel_size_from=alt)
    print(f"squidpy crop: {real.um_per_px:.4f} µm/px from the {real.pixel_size_source.split(' (')[0]}; the "
          f"{'spot pitch' if alt == 'pitch' else 'spot diameter'} would give {other.um_per_px:.4f} µm/px "
          f"({other.pixel_size_source}) - choose with `--pixel-size-from {alt}` (here, in a new --out) or "
          f"`stalign prep --pixel-size-from {alt}` / `--um-per-px`")
    rows = ctx.rows.setdefault("prep", [])
    for name, sample in (("squidpy", real), ("synthetic", fake)):
        shards = ctx.out / "shards" / name
        manifest = _prepare(ctx, [sample], shards, n_top_genes=a.n_top_genes, progress=not a.quiet)
        ctx.data[f"shards_{name}"] = shards
        for entry in manifest["slides"]:
            rows.append({"data": name, "slide": entry["slide_id"], "spots": entry.get("n_input_spots"),
                         "kept": entry["n_spots"], "dropped": entry["n_background_dropped"],
                         "padded": entry["n_padded"], "genes": len(manifest["genes"]),
                         "expression": manifest["expression"], "um_per_px": round(entry["um_per_px"], 4),
                         "pixel size from": entry["pixel_size_source"].split(" (")[0],
                         "shard MB": round((shards / entry["shard"]).stat().st_size / 1e6, 1)})
        print(f"{name}: {shards / 'manifest.json'}")


TRAIN_TABLE = "train: held-out retrieval on the synthetic slide"
CROP_TABLE = "evaluate: held-out expression on the real crop"
HEATMAP_TABLE = "predict: heat maps over the H&E"
TRAIN_SLIDE, HELDOUT_SLIDE = "crop_train", "crop_heldout"


def _shards(ctx: DemoContext, name: str) -> Path:
    root = ctx.data.get(f"shards_{name}") or ctx.out / "shards" / name
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"{root / 'manifest.json'}: no {name} shards; run the prep stage first "
                                f"(stalign demo --out {ctx.out} --stages fetch,prep)")
    return root


def _train_overrides(ctx: DemoContext, steps: int | None) -> dict[str, Any]:
    """Config keys that the demo's options override (None: the config file's value)."""
    a = ctx.args
    values = {"max_steps": steps, "batch_size": a.batch_size, "threads": a.threads, "split_by": a.split_by}
    return {"progress": not a.quiet, **{k: v for k, v in values.items() if v is not None}}


@stage("train")
def train_stage(ctx: DemoContext) -> None:
    """Align the stalign-demo model on the synthetic slide (known image<->expression link); held-out recall."""
    from stalign.training import train_from_config
    from stalign.training.metrics import format_retrieval

    a = ctx.args
    result = train_from_config(a.config, data=str(_shards(ctx, "synthetic")), output_dir=str(ctx.out / "train"),
                               **_train_overrides(ctx, a.train_steps))
    m = result.metrics
    if not m:
        raise InputError(f"{a.config}: the demo needs held-out spots (val_fraction > 0) to report recall")
    ctx.data["train_checkpoint"] = result.checkpoint
    print(f"held-out retrieval after {result.step} steps ({result.seconds:.0f} s): {format_retrieval(m)}")
    rows = ctx.rows.setdefault(TRAIN_TABLE, [])
    loss = f"{result.losses[0][1]:.3f} -> {result.losses[-1][1]:.3f}" if result.losses else ""
    for direction, key in (("image -> gene", "image_to_gene_recall"), ("gene -> image", "gene_to_image_recall")):
        rows.append({"retrieval": direction, **{f"R@{k}": f"{m[f'{key}@{k}']:.3f}" for k in (1, 5, 10)},
                     **{f"chance@{k}": f"{m[f'chance@{k}']:.3f}" for k in (1, 5, 10)},
                     "held-out spots": int(m["n_spots"]), "steps": result.step, "train loss": loss})
    ctx.notes[TRAIN_TABLE] = [
        (f"recall of each held-out spot's own expression among all held-out spots (and back); chance@k = k / "
         f"{int(m['n_spots'])}; " + _split_note(result.output_dir)),
        f"model: {result.checkpoint} ({a.config}, {result.seconds:.0f} s)"]


def _split_note(output_dir: Path) -> str:
    """How the run held out its validation spots (from the resolved config written beside the checkpoint)."""
    import yaml

    by = yaml.safe_load((Path(output_dir) / "config.yaml").read_text()).get("split_by", "spot")
    return _SPLIT_NOTE.get(by, f"held-out spots split by {by}")


_SPLIT_NOTE = {
    "block": ("held-out spots are square blocks of the slide with a niche-wide margin: no training crop, niche or "
              "neighbour overlaps them"),
    "spot": "held-out spots are random spots of the slide (their niche crops overlap training spots)",
    "slide": "held-out spots are whole held-out slides",
}


def _real_sample(ctx: DemoContext) -> Any:
    from stalign.data.fetch import fetch
    from stalign.data.readers import read_anndata_image

    folder = ctx.data.get("squidpy_dir") or fetch(SQUIDPY)
    return read_anndata_image(folder / "test_data.h5ad", folder / "test_img.jpg", slide_id="squidpy_visium_crop",
                              pixel_size_from=ctx.args.pixel_size_from)


def _prepare(ctx: DemoContext, samples: list[Any], root: Path, **kw: Any) -> dict[str, Any]:
    """``prepare`` the samples into ``root`` at the demo's crop size (``kw``: the panel, progress); its manifest.
    Resumed shards must have been cut at the samples' pixel size (a changed ``--pixel-size-from`` needs a new
    --out)."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare

    manifest = prepare(samples, root, crop=CropSpec(patch_px=ctx.args.patch_px), workers=1, **kw)
    kept = {e["slide_id"]: e["um_per_px"] for e in manifest["slides"]}
    for s in samples:
        if abs(kept[s.slide_id] - s.um_per_px) > 1e-9 * s.um_per_px:
            raise InputError(f"{root}: shards of {s.slide_id} were cut at {kept[s.slide_id]:.4f} µm/px, this run "
                             f"asks {s.um_per_px:.4f}; use another --out (or delete {root})")
    return manifest


def spatial_folds(xy: Any, n_folds: int) -> Any:
    """Fold of each spot: ``n_folds`` equal-width bands across the longer axis of the (N, 2) centres."""
    import numpy as np

    xy = np.asarray(xy, np.float64)
    if n_folds < 2:
        raise InputError(f"need at least 2 folds, got {n_folds}")
    v = xy[:, int(np.ptp(xy[:, 1]) >= np.ptp(xy[:, 0]))]
    folds = np.minimum(((v - v.min()) / (np.ptp(v) or 1.0) * n_folds).astype(np.int64), n_folds - 1)
    empty = sorted(set(range(n_folds)) - set(folds.tolist()))
    if empty:
        raise InputError(f"{len(xy)} spots leave fold(s) {empty} empty; use fewer folds")
    return folds


def _fold_dir(ctx: DemoContext, fold: int) -> Path:
    return ctx.out / "crop" / f"fold{fold}"


@stage("evaluate")
def evaluate_stage(ctx: DemoContext) -> None:
    """Per spatial fold of the real crop: shards of its training and held-out spots (two slides, so no niche
    or neighbour of a training spot carries held-out expression), a model trained on the training spots only,
    and ``heldout_table``; the folds are averaged into one table."""
    import numpy as np
    import pandas as pd

    import stalign
    from stalign.data.dataset import ShardDataset
    from stalign.data.readers import read_anndata_image
    from stalign.data.shards import read_manifest
    from stalign.tasks.bench import heldout_table
    from stalign.training import train_from_config

    a = ctx.args
    real = _real_sample(ctx)
    genes = list(read_manifest(_shards(ctx, "squidpy"))["genes"])
    folds = spatial_folds(real.adata.obsm["spatial"][:, :2], a.crop_folds)
    print(f"pixel size {real.um_per_px:.4f} µm/px from the {real.pixel_size_source}")
    print(f"{a.crop_folds} spatial folds (bands across the crop's longer axis) of "
          f"{np.bincount(folds).tolist()} held-out spots; {len(genes)} genes (the panel of the prep stage)")
    tables = []
    for f in range(a.crop_folds):
        print(f"fold {f}: training on {int((folds != f).sum())} spots, predicting {int((folds == f).sum())}")
        root = _fold_dir(ctx, f) / "shards"
        samples = [read_anndata_image(real.adata[mask].copy(), real.image_path, slide_id=slide,
                                      pixel_size_from=a.pixel_size_from)
                   for mask, slide in ((folds != f, TRAIN_SLIDE), (folds == f, HELDOUT_SLIDE))]
        _prepare(ctx, samples, root, genes=genes, progress=False)
        result = train_from_config(a.crop_config, data=str(root), slides=[TRAIN_SLIDE],
                                   output_dir=str(_fold_dir(ctx, f) / "train"), **_train_overrides(ctx, a.crop_steps))
        table = heldout_table(stalign.load_checkpoint(result.checkpoint), root, k=a.k, progress=not a.quiet,
                              train=ShardDataset(root, slides=[TRAIN_SLIDE]).indices,
                              test=ShardDataset(root, slides=[HELDOUT_SLIDE]).indices)
        tables.append(table.assign(fold=f, train_loss_first=result.losses[0][1], train_loss_last=result.losses[-1][1]))
    folds_table = pd.concat(tables, ignore_index=True)
    folds_table.to_csv(ctx.out / "crop" / "heldout_folds.csv", index=False)
    ctx.data["crop_folds"] = folds
    rows = ctx.rows.setdefault(CROP_TABLE, [])
    for method, g in folds_table.groupby("method", sort=False):
        w = g["n_test"] / g["n_test"].sum()
        r = g["pearson_mean"]
        rows.append({"method": method,
                     "pearson r (mean ± std over genes)": (f"{r.mean():.3f} ± {g['pearson_std'].mean():.3f}"
                                                           if r.notna().any() else "undefined (constant)"),
                     "r per fold (min .. max)": f"{r.min():.3f} .. {r.max():.3f}" if r.notna().any() else "-",
                     "MSE": f"{(g['mse'] * w).sum():.3f}", "MAE": f"{(g['mae'] * w).sum():.3f}",
                     "held-out spots": int(g["n_test"].sum())})
    losses = folds_table.drop_duplicates("fold")
    crops = read_manifest(_fold_dir(ctx, 0) / "shards")
    ctx.notes[CROP_TABLE] = [
        (f"Pearson r per gene over one fold's held-out spots, mean ± std over the {len(genes)} genes, averaged "
         f"over {a.crop_folds} spatial folds; MSE/MAE over all held-out spots; per fold: "
         f"{ctx.out / 'crop' / 'heldout_folds.csv'}"),
        (f"pixel size {real.um_per_px:.4f} µm/px from the {real.pixel_size_source}; spot/niche crops "
         f"{crops['spot_um']:g}/{crops['niche_um']:g} µm at {crops['patch_px']} px"),
        (f"each fold's model ({a.crop_config}) trained on that fold's training spots only (train loss "
         f"{losses['train_loss_first'].mean():.2f} -> {losses['train_loss_last'].mean():.2f}, mean over folds); "
         "the zero-shot bank holds their gene embeddings + expression; the gene panel (top variance) is chosen "
         f"on all {len(folds)} spots, as HEST does; ridge rows: PCA + ridge fit on the training spots"),
        (f"honest note: {len(folds)} spots are too few to show image -> expression learning (~"
         f"{round(len(folds) * (1 - 1 / a.crop_folds))} training spots per fold, ~{round(len(folds) / a.crop_folds)} "
         "held out): differences of this size are noise, and the neighbour average (no image) is the one to beat. "
         "Learning is shown on the synthetic slide (stage train); this table checks the whole path on real data.")]


@stage("predict")
def predict_stage(ctx: DemoContext) -> None:
    """Zero-shot predictions of each fold's held-out spots from the H&E (``predict_slide``, bank = the fold's
    training spots), pooled over folds, and heat maps of the most variable genes: predicted vs measured."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    import stalign
    from stalign.tasks.embed import bank_from_shards
    from stalign.tasks.heatmaps import heatmap_limits
    from stalign.tasks.hest import pearson_per_gene
    from stalign.tasks.predict import predict_slide, write_heatmaps

    a = ctx.args
    real = _real_sample(ctx)
    xy = np.asarray(real.adata.obsm["spatial"], np.float64)[:, :2]
    folds = ctx.data.get("crop_folds")
    folds = spatial_folds(xy, a.crop_folds) if folds is None else folds
    pred, uns = None, {}
    for f in range(int(folds.max()) + 1):
        ckpt = _fold_dir(ctx, f) / "train" / "final"
        if not (ckpt / "config.json").is_file():
            raise FileNotFoundError(f"{ckpt}: no model of fold {f}; run the evaluate stage first")
        model = stalign.load_checkpoint(ckpt)
        bank = bank_from_shards(model, _fold_dir(ctx, f) / "shards", slides=[TRAIN_SLIDE], progress=False)
        test = np.flatnonzero(folds == f)
        res = predict_slide(model, real.image_path, reference=bank, coords=xy[test], um_per_px=real.um_per_px,
                            barcodes=list(real.adata.obs_names[test]), k=a.k, progress=not a.quiet)
        pred = np.zeros((len(xy), res.n_vars), np.float32) if pred is None else pred
        pred[test] = res.X
        uns = dict(res.uns["stalign"], reference=f"each fold's training spots ({ctx.out / 'crop'})",
                   pixel_size_source=real.pixel_size_source)
    genes = list(res.var_names)
    measured = real.adata[:, genes].X
    measured = np.asarray(measured.toarray() if hasattr(measured, "toarray") else measured, np.float32)
    r = pearson_per_gene(measured, pred)
    var = pd.DataFrame({"pearson_r_pooled": r}, index=pd.Index(genes, dtype=str))
    out = ad.AnnData(X=pred, obs=pd.DataFrame(index=real.adata.obs_names.astype(str)), var=var,
                     layers={"zero_shot": pred, "measured": measured}, obsm={"spatial": xy},
                     uns={"stalign": uns})
    out.obs["fold"] = folds
    folder = ctx.out / "heatmaps"
    folder.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(folder / "heldout_zero_shot.h5ad")
    top = [genes[i] for i in np.argsort(-measured.var(axis=0), kind="stable")[:a.heatmap_genes]]
    spot_px = 55.0 / real.um_per_px  # Visium spots are 55 µm wide
    cols = [genes.index(g) for g in top]
    limits = heatmap_limits(pred[:, cols], measured[:, cols])  # one colour scale for predicted and measured
    shown = write_heatmaps(out, real.image_path, top, folder / "predicted", layer="zero_shot", limits=limits,
                           label="predicted expression (zero-shot, held out)", spot_diameter_px=spot_px)
    truth = write_heatmaps(out, real.image_path, top, folder / "measured", layer="measured", limits=limits,
                           label="measured expression", spot_diameter_px=spot_px)
    rows = ctx.rows.setdefault(HEATMAP_TABLE, [])
    for gene, p_png, m_png in zip(top, shown, truth):
        rows.append({"gene": gene, f"r ({len(xy)} held-out spots, pooled)": f"{var.loc[gene, 'pearson_r_pooled']:.3f}",
                     "predicted": str(p_png), "measured": str(m_png)})
        print(f"{gene}: {p_png} | {m_png}")
    ctx.notes[HEATMAP_TABLE] = [
        (f"the {len(top)} most variable genes (not chosen by score); zero-shot retrieval (k={a.k}) of every spot "
         "from the H&E by the model of the fold that held it out (bank: that fold's training spots); r pooled over "
         "folds, so fold-to-fold level shifts count too."),
        f"pixel size {uns['um_per_px']:.4f} µm/px from the {real.pixel_size_source}",
        f"predictions + measured values: {folder / 'heldout_zero_shot.h5ad'}"]
