"""``stalign heatmaps PRED.h5ad --genes ...``: redraw heat maps from an existing prediction (no model, no slide
embedding): the slide and pixel size come from the prediction's ``uns['stalign']`` unless a slide input is given
(any of predict's: --slide, --spaceranger, --hest, --h5ad + --image, --visium-hd)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stalign.commands.common_args import SlideQuery, add_slide_source_args, sample_input, slide_query
from stofm.util.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("heatmaps", help="redraw heat maps of genes from a prediction (.h5ad of stalign predict)")
    p.add_argument("prediction", help="the .h5ad written by stalign predict")
    p.add_argument("--genes", nargs="+", required=True, help="genes to draw")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    add_slide_source_args(p, required=False)  # default: the slide and pixel size recorded in the prediction
    p.add_argument("--layer", default=None, help="a layer instead of X (e.g. zero_shot, fewshot)")
    p.add_argument("--mode", choices=("spots", "grid"), default="spots")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stalign.tasks.predict import write_heatmaps
    from stalign.tasks.retrieval import gene_indices
    from stofm.util.safe_files import read_h5ad

    adata = read_h5ad(args.prediction, what="prediction")
    info = dict(adata.uns.get("stalign", {}))
    if "spatial" not in adata.obsm:
        raise InputError(f"{args.prediction}: no obsm['spatial'] (not a stalign prediction?)")
    if args.layer and args.layer not in adata.layers:
        raise InputError(f"{args.prediction}: no layer {args.layer!r} (layers: {list(adata.layers)})")
    if args.coords:
        raise InputError(f"--coords {args.coords}: heat maps are drawn at the prediction's own spots")
    gene_indices(list(adata.var_names), args.genes, what=f"the prediction {args.prediction}")
    _dense_values(adata, args.layer)
    if not args.slide and sample_input(args) is None:
        args.slide = info.get("slide")
        if not args.slide:
            raise InputError(f"{args.prediction}: no slide recorded; pass --slide (or another slide input)")
    if args.slide and args.um_per_px is None:
        args.um_per_px = info.get("um_per_px")
    query = slide_query(args)
    _check_same_image(adata, query, args.prediction, info.get("slide", "?"))
    slide = query.slide
    diameter = info.get("spot_diameter_um")
    label = f"predicted expression ({args.layer or info.get('X', 'X')})"
    paths = write_heatmaps(adata, slide, args.genes, Path(args.out), layer=args.layer, mode=args.mode, label=label,
                           spot_diameter_px=float(diameter) / float(slide.um_per_px) if diameter else None)
    print(f"{len(paths)} heat maps -> {args.out}")
    return 0


def _dense_values(adata: Any, layer: str | None) -> None:
    """X (or ``layer``) as a dense float array: an AnnData saved with sparse values (e.g. by another tool) is drawn
    like stalign's own dense predictions."""
    import numpy as np
    from scipy import sparse

    values = adata.layers[layer] if layer else adata.X
    if values is None:
        raise InputError(f"the prediction has no values in {'layer ' + repr(layer) if layer else 'X'}")
    dense = np.asarray(values.toarray() if sparse.issparse(values) else values, dtype=np.float32)
    if layer:
        adata.layers[layer] = dense
    else:
        adata.X = dense


def _check_same_image(adata: Any, query: SlideQuery, prediction: str, recorded: str) -> None:
    """A reader's spots that the prediction also holds must sit at the same pixels (else its obsm['spatial'] is
    in another image's pixels, e.g. the hires PNG against the full-resolution image)."""
    import numpy as np

    if query.coords is None or not query.barcodes:
        return
    where = {b: i for i, b in enumerate(query.barcodes)}
    shared = [(i, where[b]) for i, b in enumerate(adata.obs_names) if b in where]
    if not shared:
        raise InputError(f"{prediction}: none of its {adata.n_obs} spots is a spot of {query.slide.path} "
                         f"(e.g. {adata.obs_names[0]!r})")
    mine, theirs = (np.asarray(ix) for ix in zip(*shared))
    gap = np.abs(np.asarray(adata.obsm["spatial"], np.float64)[mine] - query.coords[theirs]).max(1)
    if gap.max() > 1.0:
        k = int(np.argmax(gap))
        raise InputError(f"{prediction}: its spots are in the pixels of {recorded}, not of {query.slide.path} "
                         f"(spot {adata.obs_names[mine[k]]}: {adata.obsm['spatial'][mine[k]].round(1).tolist()} vs "
                         f"{query.coords[theirs[k]].round(1).tolist()} px); give the image the prediction was made on")
