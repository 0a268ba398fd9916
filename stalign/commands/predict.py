"""``stalign predict``: expression maps of a slide (zero-shot retrieval and/or a few-shot head) -> AnnData + PNGs."""
from __future__ import annotations

import argparse
from pathlib import Path

from stalign.commands.common_args import (
    add_cache_args,
    add_index_args,
    add_slide_args,
    crop_args,
    index_args,
    slide_query,
)
from stofm.util.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict expression over a slide (zero-shot retrieval / few-shot head)",
                       description="Read a slide (an image, a Space Ranger or Visium HD folder, a HEST-1k sample, "
                                   "or an AnnData + image), tile its tissue (or take its spots / --coords), check "
                                   "query against reference (pixel size, upsampling, gene panel), embed spot and "
                                   "niche crops with a trained model, and predict expression by retrieval from a reference (bank or "
                                   "shards) and/or with a few-shot head. Writes AnnData and heat-map PNGs.")
    p.add_argument("--model", required=True, help="checkpoint folder (config.json + model.safetensors)")
    add_slide_args(p)
    add_cache_args(p)
    p.add_argument("--reference", default=None, help="reference bank folder (stalign retrieve bank) or shards folder")
    p.add_argument("--fewshot-head", default=None, help="few-shot head folder (stalign fewshot --out)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--genes", nargs="+", default=None, help="genes to predict (default: the model's panel)")
    p.add_argument("--k", type=int, default=50, help="reference spots averaged per prediction (default 50)")
    p.add_argument("--temperature", type=float, default=0.05, help="softmax temperature of the weights (0.05)")
    p.add_argument("--heatmaps", default=None, help="folder for heat-map PNGs (default: beside --out)")
    p.add_argument("--heatmap-genes", nargs="+", default=None,
                   help="genes to draw (default: the first 4 of --genes / the panel); 'none' for no PNGs")
    p.add_argument("--heatmap-mode", choices=("spots", "grid"), default="spots")
    add_index_args(p)
    p.set_defaults(func=run)


def check_inputs(args: argparse.Namespace) -> tuple:
    """Open every input before any heavy step (the reference is embedded only after this); all problems at once.
    Returns (model, head, query: a ``SlideQuery``)."""
    import stalign
    from stalign.tasks.fewshot_io import load_head
    from stalign.tasks.retrieval import gene_indices

    problems: list[str] = []

    def attempt(fn, default=None):
        try:
            return fn()
        except (ValueError, OSError) as err:
            problems.append(" ".join(str(err).split()))
            return default

    model = attempt(lambda: stalign.load_checkpoint(args.model))
    head = attempt(lambda: load_head(args.fewshot_head)) if args.fewshot_head else None
    query = attempt(lambda: slide_query(args))
    if args.reference and not Path(args.reference).exists():
        problems.append(f"{args.reference}: reference (bank or shards folder) does not exist")
    if not args.reference and not args.fewshot_head:
        problems.append("give --reference (zero-shot) and/or --fewshot-head")
    if not str(args.out).endswith(".h5ad"):
        problems.append(f"--out {args.out}: the output is an AnnData file and must end in .h5ad")
    if model is not None:
        genes = args.genes or list(model.genes)
        attempt(lambda: gene_indices(model.genes, genes, what="the model"))
        drawn = [g for g in args.heatmap_genes or [] if g.lower() != "none"]
        attempt(lambda: gene_indices(genes, drawn, what="the predicted genes (--heatmap-genes)"))
    for name in ("k", "batch_size"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        problems.append(f"--temperature must be > 0, got {args.temperature}")
    if problems:
        raise InputError(f"{len(problems)} problem(s): " + "; ".join(problems) if len(problems) > 1 else problems[0])
    return model, head, query


def run(args: argparse.Namespace) -> int:
    from stofm.util.output_paths import output_lock

    inputs = check_inputs(args)  # nothing is written (not even the lock) before every input is checked
    with output_lock(args.out, command="stalign predict"):  # a second predict to the same --out is refused
        return _predict(args, *inputs)


def _predict(args: argparse.Namespace, model, head, query) -> int:
    from stalign.tasks.predict import predict_slide, write_heatmaps
    from stalign.tasks.scverse import carry_obs
    from stofm.util.output_paths import atomic_write_path

    diameter = args.spot_diameter_um if args.spot_diameter_um is not None else query.spot_diameter_um
    adata = predict_slide(model, query.slide, reference=args.reference, coords=query.coords,
                          barcodes=query.barcodes, crop=crop_args(args), step_um=args.step_um,
                          spot_diameter_um=diameter, query_genes=query.genes, library_id=query.library_id,
                          k=args.k, temperature=args.temperature, fewshot_head=head,
                          genes=args.genes, batch_size=args.batch_size, workers=args.workers, device=args.device,
                          progress=not args.quiet, cache=not args.no_cache, **index_args(args))
    carry_obs(adata, query.obs)
    if query.pixel_size_sources:
        adata.uns["stalign"]["pixel_size_sources"] = query.pixel_size_sources
    out = Path(args.out)
    with atomic_write_path(out) as tmp:  # complete under the final name, or not there at all
        adata.write_h5ad(tmp)
    s = adata.uns["stalign"]
    print(f"{adata.n_obs} spots x {adata.n_vars} genes -> {out} (X = {s['X']}; {s['um_per_px']:.4g} µm/px from "
          f"{s['pixel_size_source']}; crops {s['spot_um']:g}/{s['niche_um']:g} µm at {s['patch_px']} px, "
          f"{s['resample']})")
    genes = args.heatmap_genes or list(adata.var_names[:4])
    if [g.lower() for g in genes] != ["none"]:
        folder = Path(args.heatmaps) if args.heatmaps else out.with_suffix("").with_name(out.stem + "_heatmaps")
        paths = write_heatmaps(adata, query.slide, genes, folder, mode=args.heatmap_mode,
                               spot_diameter_px=s["spot_diameter_um"] / s["um_per_px"])
        print(f"{len(paths)} heat maps -> {folder}")
    return 0
