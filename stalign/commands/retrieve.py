"""``stalign retrieve``: build a reference bank; image -> most similar reference spots; gene signature ->
regions of a slide (heat map)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from stalign.commands.common_args import (
    add_cache_args,
    add_index_args,
    add_run_args,
    add_slide_args,
    crop_args,
    index_args,
    slide_query,
)
from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path
from stofm.util.safe_files import require_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrieve", help="reference banks and retrieval queries (image -> spots, genes -> regions)")
    rsub = p.add_subparsers(dest="retrieve_command", metavar="ACTION", required=True)
    b = rsub.add_parser("bank", help="embed shards into a reusable reference bank")
    b.add_argument("--model", required=True, help="checkpoint folder")
    b.add_argument("--shards", required=True, help="shards folder (stalign prep --out)")
    b.add_argument("--out", required=True, help="bank folder to write")
    b.add_argument("--index", choices=("ivf", "hnsw"), default=None,
                   help="also build a faiss index now, cached beside the bank (for banks of millions of spots)")
    add_run_args(b, workers=2)
    add_cache_args(b)
    b.set_defaults(func=run_bank)
    for name, helptext in (("image", "spots of a slide -> most similar reference spots and their expression"),
                           ("signature", "gene signature -> where on a slide it lies (scores + heat map)")):
        q = rsub.add_parser(name, help=helptext)
        q.add_argument("--model", required=True, help="checkpoint folder")
        q.add_argument("--reference", required=True, help="reference bank folder or shards folder")
        add_slide_args(q)
        add_cache_args(q)
        q.add_argument("--out", required=True, help="CSV of hits (image) / PNG heat map (signature)")
        if name == "image":
            q.add_argument("--k", type=int, default=10, help="hits per query spot (default 10)")
            add_index_args(q)
            q.set_defaults(func=run_image)
        else:
            g = q.add_mutually_exclusive_group(required=True)
            g.add_argument("--genes", nargs="+", help="signature genes (mean z-scored expression)")
            g.add_argument("--expression", help="CSV gene,value: an expression profile over the reference panel")
            q.add_argument("--top", type=int, default=25, help="reference spots that define the query (25)")
            q.set_defaults(func=run_signature, out_suffixes=(".csv", ".h5ad"))  # written beside the PNG


def run_bank(args: argparse.Namespace) -> int:
    import stalign
    from stalign.tasks.embed import bank_from_shards

    model = stalign.load_checkpoint(args.model)
    bank = bank_from_shards(model, args.shards, batch_size=args.batch_size, workers=args.workers,
                            device=args.device, progress=not args.quiet, cache=not args.no_cache)
    print(f"{bank} -> {bank.save(args.out)}")
    if args.index:
        ann = bank.ann_index(args.index, progress=not args.quiet)
        print(f"{args.index} index ({', '.join(f'{k} {v}' for k, v in ann.params.items())}) cached in {args.out}")
    return 0


def _embed(args: argparse.Namespace, model: Any = None):
    """(bank, embed_slide's result, spot names) of the query slide; the slide input is read, its spot centres
    checked (``check_coords``) and the slide checked against the reference (``checked_reference``) before
    anything is embedded. ``model``: already loaded."""
    import stalign
    from stalign.tasks.embed import load_reference
    from stalign.tasks.predict import check_coords, checked_reference, drawn_spot_diameter_um, embed_slide

    model = model if model is not None else stalign.load_checkpoint(args.model)
    query = slide_query(args)
    coords = None if query.coords is None else check_coords(query.coords, query.slide)  # predict's check
    reference, crop, _ = checked_reference(model, args.reference, slide=query.slide, crop=crop_args(args),
                                           query_genes=query.genes)
    bank = load_reference(reference, model, batch_size=args.batch_size, workers=args.workers,
                          device=args.device, progress=not args.quiet, cache=not args.no_cache)
    e = embed_slide(model, query.slide, crop=crop, coords=coords, step_um=args.step_um,
                    batch_size=args.batch_size, workers=args.workers, device=args.device, progress=not args.quiet)
    given = args.spot_diameter_um if args.spot_diameter_um is not None else query.spot_diameter_um
    e["spot_diameter_px"] = drawn_spot_diameter_um(given, None if e["tiled"] else e["coords"], crop.spot_um,
                                                   float(e["slide"].um_per_px)) / float(e["slide"].um_per_px)
    e["library_id"] = query.library_id
    return bank, e, query.barcodes


def run_image(args: argparse.Namespace) -> int:
    bank, e, barcodes = _embed(args)
    hits = bank.hits(e["embeddings"], k=min(args.k, len(bank)), **index_args(args))
    names = barcodes or [f"tile_{i}" for i in range(len(e["coords"]))]
    hits.insert(1, "query_spot", [names[q] for q in hits["query"]])
    hits.insert(2, "query_x", e["coords"][hits["query"], 0])
    hits.insert(3, "query_y", e["coords"][hits["query"], 1])
    out = Path(args.out)
    with atomic_write_path(out) as tmp:
        hits.to_csv(tmp, index=False)
    print(hits.head(min(len(hits), 3 * args.k)).to_string(index=False))
    print(f"{len(hits)} hits of {len(names)} query spots -> {out}")
    return 0


def _read_signature(args: argparse.Namespace, genes: list[str]) -> tuple[Any, str]:
    """(signature: gene names or a vector over ``genes``, label) of ``--genes`` / ``--expression``, checked against
    the model's panel (the reference's, which must equal it) before the slide is read or anything embedded."""
    import numpy as np
    import pandas as pd

    from stalign.tasks.retrieval import gene_indices

    if args.genes:
        gene_indices(genes, list(args.genes), what="the model")
        return list(args.genes), "signature " + "+".join(args.genes[:4])
    path = require_path(args.expression, "--expression file")
    try:
        table = pd.read_csv(path, header=None, names=["gene", "value"], dtype={"gene": str})
        values = pd.to_numeric(table["value"], errors="raise").to_numpy(float)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"--expression {path}: not a CSV of gene,value rows ({' '.join(str(err).split())[:120]})"
                         ) from None
    try:
        cols = gene_indices(genes, table["gene"].tolist(), what="the model")
    except InputError as err:
        raise type(err)(f"--expression {path}: {err}") from None
    signature = np.full(len(genes), np.nan)
    signature[cols] = values
    if not np.isfinite(signature).all():
        missing = [g for g, v in zip(genes, signature) if not np.isfinite(v)]
        raise InputError(f"--expression {path}: no finite value for {len(missing)} of the panel's genes, e.g. "
                         f"{missing[:5]}")
    return signature, f"signature {path.stem}"


def run_signature(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    import stalign
    from stalign.tasks.heatmaps import plot_gene_heatmaps
    from stalign.tasks.retrieval import query_signature

    model = stalign.load_checkpoint(args.model)
    signature, label = _read_signature(args, list(model.genes))  # before anything is read or embedded
    bank, e, barcodes = _embed(args, model)
    scores = query_signature(signature, bank=bank, embeddings=e["embeddings"], top=args.top)
    out = Path(args.out)
    thumb, ds = e["slide"].thumbnail(1024)
    written = plot_gene_heatmaps(scores[:, None], [label], e["coords"], out.parent, thumbnail=thumb, downsample=ds,
                                 spot_diameter_px=e["spot_diameter_px"], prefix=out.stem + "_",
                                 label="signature score (cosine similarity)")
    Path(written[0]).replace(out)
    names = barcodes or [f"tile_{i}" for i in range(len(scores))]
    pd.DataFrame({"spot": names, "x": e["coords"][:, 0], "y": e["coords"][:, 1], "score": scores}).to_csv(
        out.with_suffix(".csv"), index=False)
    _write_scores_h5ad(out.with_suffix(".h5ad"), scores, names, e, label=label)
    best = np.argsort(-scores)[:5]
    print("top regions: " + ", ".join(f"{names[i]} ({scores[i]:.3f})" for i in best))
    print(f"heat map -> {out}; scores -> {out.with_suffix('.csv')}, {out.with_suffix('.h5ad')} (scanpy-ready)")
    return 0


def _write_scores_h5ad(path: Path, scores, names, e: dict, *, label: str) -> None:
    """The signature scores as AnnData that scanpy.pl.spatial plots (obs['signature_score'], images, scale factors)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from stalign.tasks.scverse import add_spatial_images

    adata = ad.AnnData(X=np.asarray(scores, np.float32)[:, None], obs=pd.DataFrame(index=pd.Index(names, dtype=str)),
                       var=pd.DataFrame(index=["signature_score"]), obsm={"spatial": e["coords"]})
    adata.obs["signature_score"] = np.asarray(scores, np.float32)
    slide = e["slide"]
    lib = add_spatial_images(adata, slide, spot_diameter_px=e["spot_diameter_px"], library_id=e["library_id"])
    adata.uns["stalign"] = {"X": "signature score: cosine similarity of each spot's image embedding to the "
                                  "signature's gene embedding (not expression)", "signature": label,
                            "library_id": lib, "um_per_px": float(slide.um_per_px),
                            "pixel_size_source": slide.pixel_size_source, "slide": str(slide.path)}
    with atomic_write_path(path) as tmp:
        adata.write_h5ad(tmp)

