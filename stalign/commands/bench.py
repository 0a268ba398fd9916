"""``stalign bench``: HEST-Benchmark protocol on prepared shards for any encoder spec."""
from __future__ import annotations

import argparse
from pathlib import Path

from stalign.commands.predict import add_run_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="HEST-Benchmark protocol (PCA-256 + ridge, Pearson per gene) for encoders",
                       description="Top-50 HVGs, PCA-256 + ridge on frozen features, folds by slide, Pearson r per "
                                   "gene averaged; one row per encoder with Pearson mean ± std over folds, pooled "
                                   "Pearson, MSE and MAE. Published HEST averages: ResNet50-ImageNet 0.33, best 0.42.")
    p.add_argument("--shards", required=True, help="shards folder (stalign prep --out)")
    p.add_argument("--encoders", nargs="+", required=True,
                   help="specs: model:CKPT, backbone:CKPT, random:SPEC, or an image-encoder spec (efficientnet-lite0, "
                        "timm:NAME, uni, ...) with its pretrained weights")
    p.add_argument("--by", choices=("slide", "spot"), default="slide",
                   help="folds by slide (HEST; default) or spot-level k-fold for a single slide")
    p.add_argument("--folds", type=int, default=None, help="number of folds (default: one per slide / 5 spot folds)")
    p.add_argument("--genes", type=int, default=50, help="top highly variable genes (default 50; 0 = all)")
    p.add_argument("--latent-dim", type=int, default=256, help="PCA components (default 256)")
    p.add_argument("--arch", default=None,
                   help="architecture of encoders given as a bare weights file (e.g. uni for --encoders /path/uni.bin;"
                        " or write uni:/path/uni.bin)")
    p.add_argument("--out", default=None, help="CSV of the table")
    add_run_args(p, seed=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stalign.tasks.bench import bench_shards, format_table

    table = bench_shards(args.shards, args.encoders, by=args.by, n_splits=args.folds, k_genes=args.genes or None,
                         latent_dim=args.latent_dim, batch_size=args.batch_size, workers=args.workers,
                         device=args.device, seed=args.seed, progress=not args.quiet, arch=args.arch)
    print(format_table(table))
    print(f"{table.attrs['n_spots']} spots, {table.attrs['n_slides']} slide(s), folds by {table.attrs['by']}, "
          f"{len(table.attrs['genes'])} genes")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out, index=False)
        print(f"table -> {args.out}")
    import sys

    for spec, message in table.attrs.get("failed", {}).items():
        print(f"stalign bench: error: encoder {spec} failed (its row is missing): {message}", file=sys.stderr)
    return 1 if table.attrs.get("failed") else 0
