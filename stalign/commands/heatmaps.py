"""``stalign heatmaps PRED.h5ad --genes ...``: redraw heat maps from an existing prediction (no model, no slide
embedding): the slide and pixel size come from the prediction's ``uns['stalign']`` unless given."""
from __future__ import annotations

import argparse
from pathlib import Path

from stofm.util.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heatmaps", help="redraw heat maps of genes from a prediction (.h5ad of stalign predict)")
    p.add_argument("prediction", help="the .h5ad written by stalign predict")
    p.add_argument("--genes", nargs="+", required=True, help="genes to draw")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--slide", default=None, help="the slide (default: the one recorded in the prediction)")
    p.add_argument("--um-per-px", type=float, default=None, help="pixel size (default: the recorded one)")
    p.add_argument("--layer", default=None, help="a layer instead of X (e.g. zero_shot, fewshot)")
    p.add_argument("--mode", choices=("spots", "grid"), default="spots")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stalign.tasks.predict import open_for_prediction, write_heatmaps
    from stalign.tasks.retrieval import gene_indices
    from stofm.util.safe_files import read_h5ad

    adata = read_h5ad(args.prediction, what="prediction")
    info = dict(adata.uns.get("stalign", {}))
    if "spatial" not in adata.obsm:
        raise InputError(f"{args.prediction}: no obsm['spatial'] (not a stalign prediction?)")
    if args.layer and args.layer not in adata.layers:
        raise InputError(f"{args.prediction}: no layer {args.layer!r} (layers: {list(adata.layers)})")
    gene_indices(list(adata.var_names), args.genes, what=f"the prediction {args.prediction}")
    slide_path = args.slide or info.get("slide")
    if not slide_path:
        raise InputError(f"{args.prediction}: no slide recorded; pass --slide")
    slide = open_for_prediction(slide_path, um_per_px=args.um_per_px or info.get("um_per_px"))
    label = f"predicted expression ({args.layer or info.get('X', 'X')})"
    paths = write_heatmaps(adata, slide, args.genes, Path(args.out), layer=args.layer, mode=args.mode, label=label)
    print(f"{len(paths)} heat maps -> {args.out}")
    return 0
