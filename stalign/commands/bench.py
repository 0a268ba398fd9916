"""``stalign bench``: HEST-Benchmark protocol on prepared shards for any encoder spec."""
from __future__ import annotations

import argparse
from typing import Any

from stalign.commands.common_args import add_cache_args, add_run_args, check_at_least
from stalign.tasks.bench_folds import SCHEMES
from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="image encoders -> expression (PCA + ridge, Pearson and MSE) against baselines",
                       description="With --shards: encoders and baselines (training mean, neighbour average, colour "
                                   "statistics + ridge) on the same leak-free folds (by site/patient/slide; spatial blocks "
                                   "with a niche-wide margin within one slide), each fold's genes chosen on its "
                                   "training spots, ridge with an intercept. With --hest-bench TASK_FOLDER: "
                                   "HEST-Benchmark exactly (its genes, patient splits, patches, PCA-256 + ridge with "
                                   "its alpha rule, per-split Pearson): rows comparable with the HEST leaderboard.")
    p.add_argument("--shards", default=None, help="shards folder (stalign prep --out): own genes and folds")
    p.add_argument("--hest-bench", default=None, metavar="TASK",
                   help="a HEST-Bench task folder (bench_data/<TASK>: var_50genes.json, splits/, patches/, adata/)")
    p.add_argument("--no-pca", action="store_true", help="HEST variant: ridge on the raw features (labelled)")
    p.add_argument("--tuned-alpha", action="store_true", help="HEST variant: RidgeCV alpha on the training spots")
    p.add_argument("--per-slide", action="store_true", help="HEST variant: Pearson per test slide, then averaged")
    p.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="--hest-bench inference precision: auto (default) = each encoder's as HEST runs it (fp16 "
                        "autocast for UNI, Virchow2, H-optimus-0, H0-mini; fp32 on the CPU), or one for all; the "
                        "row says which ran")
    p.add_argument("--encoders", nargs="+", required=True,
                   help="specs: model:CKPT, backbone:CKPT, random:SPEC, or an image-encoder spec (efficientnet-lite0, "
                        "timm:NAME, uni, ...) with its pretrained weights")
    p.add_argument("--by", choices=SCHEMES, default="auto",
                   help="--shards folds: auto (default: the strictest known: by site when the slides have 2+ sites, "
                        "else by patient likewise, else by slide with 2+ slides, else spatial blocks), site (train on "
                        "some sites' slides, test on an unseen site's), patient, slide, block (within slides, "
                        "niche-wide margin), or spot (random spots: LEAKY, neighbouring spots share tissue; the rows "
                        "say so)")
    p.add_argument("--patients", default=None, metavar="FILE",
                   help="CSV/TSV with columns slide_id, patient (over the shards' own: prep --samples' patient "
                        "column)")
    p.add_argument("--sites", default=None, metavar="FILE",
                   help="CSV/TSV with columns slide_id, site (over the shards' own: prep --samples' site column, or "
                        "an obs column 'site' with one value per slide, as synth v3 slides)")
    p.add_argument("--folds", type=int, default=None,
                   help="number of folds (default: one per site/patient/slide; 5 block hold-outs or spot folds)")
    p.add_argument("--genes", type=int, default=50, help="top highly variable genes (default 50; 0 = all)")
    p.add_argument("--latent-dim", type=int, default=256, help="PCA components (default 256)")
    p.add_argument("--arch", default=None,
                   help="architecture of encoders given as a bare weights file (e.g. uni for --encoders /path/uni.bin;"
                        " or write uni:/path/uni.bin)")
    p.add_argument("--out", default=None, help="CSV of the table")
    add_run_args(p, seed=True)
    add_cache_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stalign.tasks.bench import bench_shards, format_table

    if bool(args.shards) == bool(args.hest_bench):
        raise InputError("give either --shards (own data) or --hest-bench TASK_FOLDER (the HEST-Benchmark)")
    check_at_least(args, latent_dim=1, folds=2, genes=0, batch_size=1)  # before any encoder is loaded
    if args.hest_bench:
        return _run_hest(args)
    from stalign.tasks.bench_folds import read_slide_groups

    patients = read_slide_groups(args.patients, "patient") if args.patients else None
    sites = read_slide_groups(args.sites, "site") if args.sites else None
    table = bench_shards(args.shards, args.encoders, by=args.by, n_splits=args.folds, k_genes=args.genes or None,
                         latent_dim=args.latent_dim, batch_size=args.batch_size, workers=args.workers,
                         device=args.device, seed=args.seed, progress=not args.quiet, arch=args.arch,
                         patients=patients, sites=sites, cache=not args.no_cache)
    print(format_table(table))
    print(f"{table.attrs['n_spots']} spots, {table.attrs['n_slides']} slide(s); folds: {table.attrs['folds']}; "
          f"{args.genes or 'all'} genes per fold, chosen on its training spots (own genes/folds: not comparable "
          f"with the HEST leaderboard; use --hest-bench for that)")
    print(table.attrs["feature_store"])
    _write_table(table, args.out)
    import sys

    for spec, message in table.attrs.get("failed", {}).items():
        print(f"stalign bench: error: encoder {spec} failed (its row is missing): {message}", file=sys.stderr)
    return 1 if table.attrs.get("failed") else 0


def _run_hest(args: argparse.Namespace) -> int:
    from stalign.tasks.hest_bench import hest_bench

    table = hest_bench(args.hest_bench, args.encoders, pca=not args.no_pca, latent_dim=args.latent_dim,
                       tuned_alpha=args.tuned_alpha, per_slide=args.per_slide, batch_size=args.batch_size,
                       device=args.device, arch=args.arch, progress=not args.quiet, seed=args.seed,
                       precision=args.precision)
    for _, r in table.iterrows():
        print(f"{r['task']:12s} {r['encoder']:34s} {r['kind']:8s} pearson {r['pearson_mean']:.4f} ± "
              f"{r['pearson_std']:.4f}  MSE {r['mse']:.4f} ({r['splits']} splits; {r['variant']}"
              f"{'; ' + r['precision'] if r['precision'] else ''})"
              f"{'  <- row to beat' if r['to_beat'] else ''}")
    _write_table(table, args.out)
    return 0


def _write_table(table: Any, out: str | None) -> None:
    """The table as CSV at ``out`` (if given), whole or not at all (a temporary renamed into place)."""
    if out:
        with atomic_write_path(out) as tmp:
            table.to_csv(tmp, index=False)
        print(f"table -> {out}")
