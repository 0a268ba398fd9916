"""``stalign domains``: zero-shot spatial domains from the embeddings of a slide (k-means / Leiden)."""
from __future__ import annotations

import argparse
from pathlib import Path

from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path
from stofm.util.safe_files import read_h5ad


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("domains", help="cluster a slide's embeddings into spatial domains (+ ARI/NMI, plot)",
                       description="Cluster the image embeddings of a `stalign predict` output (obsm['X_stalign']) "
                                   "into spatial domains; score them against annotations when given; plot them.")
    p.add_argument("--h5ad", required=True, help="AnnData with embeddings (e.g. the output of stalign predict)")
    p.add_argument("--obsm", default="X_stalign", help="embedding key in obsm (default X_stalign)")
    p.add_argument("--method", choices=("kmeans", "leiden"), default="kmeans")
    p.add_argument("--n-domains", type=int, default=None, help="k-means clusters (default: best silhouette, 2-10)")
    p.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution (default 1.0)")
    p.add_argument("--spatial-weight", type=float, default=0.0, help="weight of xy next to the embedding (0)")
    p.add_argument("--annotations", default=None,
                   help="obs column with reference labels, or FILE.h5ad:column (matched by obs name)")
    p.add_argument("--slide", default=None, help="slide to draw under the plot (optional)")
    p.add_argument("--um-per-px", type=float, default=None, help="pixel size of --slide (when its file lacks one)")
    p.add_argument("--out", required=True, help="PNG plot; the labelled AnnData goes beside it (.h5ad)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run, out_suffixes=(".h5ad",))  # the labelled AnnData is written beside the plot


def _annotations(adata, spec: str):
    if ":" in spec and spec.split(":", 1)[0].endswith(".h5ad"):
        path, column = spec.split(":", 1)
        other = read_h5ad(path, what="annotation file")
        if column not in other.obs:
            raise InputError(f"{path}: no obs column {column!r} (has {list(other.obs.columns)})")
        return other.obs[column].reindex(adata.obs_names).astype(object).to_numpy()
    if spec not in adata.obs:
        raise InputError(f"no obs column {spec!r} in the AnnData (has {list(adata.obs.columns)})")
    return adata.obs[spec].astype(object).to_numpy()


def run(args: argparse.Namespace) -> int:
    from stalign.tasks.domains import cluster_domains, plot_domains, score_domains

    adata = read_h5ad(args.h5ad, what="AnnData file")
    if args.obsm not in adata.obsm:
        raise InputError(f"{args.h5ad}: no obsm[{args.obsm!r}] (has {list(adata.obsm)}); run stalign predict first")
    coords = adata.obsm.get("spatial")
    labels = cluster_domains(adata.obsm[args.obsm], n_domains=args.n_domains, method=args.method,
                             coords=coords, spatial_weight=args.spatial_weight, resolution=args.resolution,
                             seed=args.seed)
    adata.obs["stalign_domain"] = [str(v) for v in labels]
    print(f"{len(set(labels.tolist()))} domains over {adata.n_obs} spots ({args.method})")
    if args.annotations:
        scores = score_domains(labels, _annotations(adata, args.annotations))
        adata.uns["stalign_domains"] = scores
        print(f"ARI {scores['ari']:.3f}  NMI {scores['nmi']:.3f}  ({scores['n_scored']} annotated spots)")
    thumb, ds, diameter = None, 1.0, None
    if args.slide:
        from stalign.tasks.predict import open_for_prediction

        settings = adata.uns.get("stalign", {})
        slide = open_for_prediction(args.slide, um_per_px=args.um_per_px or settings.get("um_per_px"))
        thumb, ds = slide.thumbnail(1024)
        if settings.get("tiled") and settings.get("spot_um"):
            diameter = float(settings["spot_um"]) / float(slide.um_per_px)
    out = plot_domains(coords, labels, args.out, thumbnail=thumb, downsample=ds, spot_diameter_px=diameter)
    with atomic_write_path(Path(args.out).with_suffix(".h5ad")) as tmp:
        adata.write_h5ad(tmp)
    print(f"plot -> {out}; labels -> {Path(args.out).with_suffix('.h5ad')}")
    return 0
