"""Command-line options and their readers shared by several commands (``predict``, ``retrieve``, ``fewshot``,
``bench``, ``prep``, ``data``): a slide input (any of prep's readers: :func:`slide_query`) and its crops, the reference bank's search engine, batch/workers/device/seed/quiet/debug,
a gene panel file."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stofm.util.errors import InputError
from stofm.util.safe_files import require_path

if TYPE_CHECKING:
    import numpy as np


def add_slide_source_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The slide inputs ``stalign prep`` reads, one per run: --slide (+ --coords), --spaceranger DIR, --hest ROOT
    SAMPLE, --h5ad FILE + --image FILE, --visium-hd DIR; with --um-per-px / --pixel-size-from (:func:`slide_query`)."""
    g = p.add_argument_group("slide input (one of)")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--slide", help="whole-slide image (any openslide format) or plain image")
    src.add_argument("--spaceranger", metavar="DIR",
                     help="Space Ranger output folder: its in-tissue spots on its hires image (or --image, the "
                          "full-resolution one), coordinates scaled to the image used")
    src.add_argument("--hest", nargs=2, metavar=("ROOT", "SAMPLE"), help="a HEST-1k sample: ROOT (st/, wsis/, "
                                                                         "metadata/) and the sample id")
    src.add_argument("--h5ad", metavar="FILE", help="AnnData with obsm['spatial'] in level-0 px of --image")
    src.add_argument("--visium-hd", metavar="DIR",
                     help="Space Ranger Visium HD binned output (binned_outputs/square_XXXum): its bins as spots")
    g.add_argument("--bin-um", type=int, default=None, metavar="UM",
                   help="--visium-hd: the bin size to read (default 16 when present, as stalign prep)")
    g.add_argument("--image", default=None, metavar="FILE",
                   help="with --h5ad: the slide its coordinates are in (required); with --spaceranger/--visium-hd: "
                        "the full-resolution image (default: the folder's hires image)")
    g.add_argument("--um-per-px", type=float, default=None,
                   help="pixel size in µm/px (needed for plain images without metadata; overrides metadata and "
                        "the readers' rules)")
    g.add_argument("--pixel-size-from", default="auto", metavar="SOURCE",
                   help="--spaceranger/--hest/--h5ad/--visium-hd: where the pixel size comes from when --um-per-px "
                        "is not given (as stalign prep: auto, metadata, spot-diameter, pitch, ...; default auto)")
    g.add_argument("--coords", default=None,
                   help="with --slide: spot centres: .h5ad (obsm['spatial'], level-0 px) or CSV with x,y[,barcode] "
                        "(default: tile the tissue)")


def add_slide_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that read crops from a slide."""
    add_slide_source_args(p)
    p.add_argument("--spot-um", type=float, default=None,
                   help="spot crop width (default: the reference bank's, else the few-shot head's, else the model's)")
    p.add_argument("--niche-um", type=float, default=None, help="niche crop width (default: as --spot-um)")
    p.add_argument("--step-um", type=float, default=None, help="tile pitch when tiling (default: the spot width)")
    p.add_argument("--resample", choices=("bilinear", "lanczos"), default=None,
                   help="crop resampling filter (default: as --spot-um; match the training data)")
    p.add_argument("--spot-diameter-um", type=float, default=None,
                   help="spot size drawn by sc.pl.spatial and the heat maps (default: the tile width when tiling; "
                        "55 µm for --spaceranger; the bin size for --visium-hd; else 0.55 x the spot pitch)")
    add_run_args(p, workers=2)


def crop_args(args: argparse.Namespace) -> dict | None:
    """The crop settings --spot-um/--niche-um/--resample change (None: the model's / reference's crops)."""
    given = {k: v for k, v in (("spot_um", args.spot_um), ("niche_um", args.niche_um),
                               ("resample", args.resample)) if v is not None}
    return given or None


def add_index_args(p: argparse.ArgumentParser) -> None:
    """--index, --nprobe, --ef-search: the reference bank's search engine (``ReferenceBank.topk``)."""
    p.add_argument("--index", choices=("auto", "flat", "ivf", "hnsw"), default="auto",
                   help="bank search: flat = exact brute force; ivf/hnsw = faiss index (pip install 'stalign[faiss]'), "
                        "built once and cached beside a saved bank, scores re-computed exactly; auto (default) = ivf "
                        "for banks of >= 1M spots when faiss is installed, else flat")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (default nlist/64, at least 32)")
    p.add_argument("--ef-search", type=int, default=None, help="HNSW search breadth (default 128)")


def index_args(args: argparse.Namespace) -> dict:
    """``index=`` and ``index_params=`` keywords from --index/--nprobe/--ef-search."""
    params = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
    for name, value in params.items():
        if value < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return {"index": args.index, "index_params": params or None}


def check_at_least(args: argparse.Namespace, **minimum: int) -> None:
    """``InputError`` naming the first flag (``latent_dim=1`` checks ``--latent-dim``) whose value is below its
    minimum; flags not given (None) pass."""
    for name, low in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise InputError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")


def add_run_args(p: argparse.ArgumentParser, *, workers: int = 0, seed: bool = False) -> None:
    """--batch-size, --workers, --device, [--seed], --quiet, --debug."""
    p.add_argument("--batch-size", type=int, default=32, help="crops per batch (default 32)")
    p.add_argument("--workers", type=int, default=workers,
                   help=f"parallel data readers (default {workers}; 0 = in process)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available)")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """--no-cache: compute shard embeddings again instead of reading the feature store (nothing is stored)."""
    p.add_argument("--no-cache", action="store_true",
                   help="do not read or write the feature store (shard embeddings computed once and reused, kept "
                        "in SHARDS/features or $STALIGN_CACHE/features; docs/performance.md): compute them again")


#: a Visium capture spot's diameter (µm), what the spots of a Space Ranger folder are drawn as
VISIUM_SPOT_UM = 55.0


@dataclass
class SlideQuery:
    """A slide to predict on, from any slide input: the opened image (with its pixel size and the rule that gave
    it), the spot centres in that image's pixels (None: tile the tissue), their names and other columns, the genes
    the query's own expression measures (None: no expression), the spot size the input defines and the pixel size
    of every source the reader found (name -> µm/px); ``library_id``: the reader's slide id (None: the image's
    file name), the key of ``uns['spatial']``."""

    slide: Any
    coords: np.ndarray | None = None
    barcodes: list[str] | None = None
    obs: Any = None
    genes: list[str] | None = None
    spot_diameter_um: float | None = None
    pixel_size_sources: dict[str, float] | None = None
    library_id: str | None = None


def slide_query(args: argparse.Namespace) -> SlideQuery:
    """The :class:`SlideQuery` of the slide input given (see :func:`add_slide_source_args`), read by the readers
    of ``stalign prep``; bad input raises an error naming the file and the value."""
    from stalign.tasks.predict import open_for_prediction, read_coords

    if sample_input(args) is None:
        slide = open_for_prediction(args.slide, um_per_px=args.um_per_px)
        if not args.coords:
            return SlideQuery(slide=slide)
        coords, barcodes, obs = read_coords(args.coords, with_obs=True)
        return SlideQuery(slide=slide, coords=coords, barcodes=barcodes, obs=obs)
    import numpy as np

    sample, spot_um = read_slide_sample(args)
    slide = open_for_prediction(sample.image_path, um_per_px=sample.um_per_px)
    slide.pixel_size_source, slide.pixel_size_note = sample.pixel_size_source, ""
    adata = sample.adata
    return SlideQuery(slide=slide, coords=np.asarray(sample.coords_px, np.float64),
                      barcodes=[str(b) for b in adata.obs_names], obs=adata.obs.reset_index(drop=True),
                      genes=[str(g) for g in adata.var_names] if adata.n_vars else None, spot_diameter_um=spot_um,
                      pixel_size_sources=dict(getattr(sample, "pixel_size_sources", None) or {}) or None,
                      library_id=str(sample.slide_id))


def sample_input(args: argparse.Namespace) -> str | None:
    """The reader input given ("--spaceranger", "--hest", "--h5ad", "--visium-hd"), or None (--slide or none);
    refuses the flags that do not go with it."""
    given = [f"--{n.replace('_', '-')}" for n in ("spaceranger", "hest", "h5ad", "visium_hd") if getattr(args, n, None)]
    if args.coords and given:
        raise InputError(f"--coords goes with --slide; {given[0]} gives its own spots")
    if args.pixel_size_from != "auto" and not given:
        raise InputError(f"--pixel-size-from {args.pixel_size_from} goes with --spaceranger, --hest, --h5ad or "
                         "--visium-hd (a --slide's pixel size: its metadata or --um-per-px)")
    if args.bin_um is not None and not args.visium_hd:
        raise InputError(f"--bin-um {args.bin_um} goes with --visium-hd")
    if args.image and not (given and given[0] in ("--spaceranger", "--h5ad", "--visium-hd")):
        raise InputError(f"--image {args.image} goes with --h5ad, --spaceranger or --visium-hd")
    return given[0] if given else None


def read_slide_sample(args: argparse.Namespace) -> tuple[Any, float | None]:
    """(the ``SlideSample`` of the reader input given, the spot diameter in µm that input defines or None), read
    by the one dispatch of slide inputs (``stalign.data.sample_spec.read_sample_spec``) after the paths are
    checked."""
    from stalign.data.sample_spec import read_sample_spec

    if args.hest:
        root, sample_id = args.hest
        require_path(root, "HEST-1k folder", folder_ok=True)
        row, spot_um = {"hest": root, "id": sample_id}, None
    elif args.h5ad:
        if not args.image:
            raise InputError(f"--h5ad {args.h5ad} needs --image (the slide its obsm['spatial'] is in)")
        require_path(args.h5ad, "AnnData file", folder_ok=True)
        require_path(args.image, "slide image", folder_ok=True)
        row, spot_um = {"h5ad": args.h5ad, "image": args.image}, None
    else:
        if args.image:
            require_path(args.image, "slide image", folder_ok=True)
        key, what = ("spaceranger", "Space Ranger folder") if args.spaceranger else ("visium_hd", "Visium HD folder")
        require_path(getattr(args, key), what, folder_ok=True)
        row, spot_um = {key: getattr(args, key), "image": args.image}, VISIUM_SPOT_UM
    sample = read_sample_spec(row, um_per_px=args.um_per_px, bin_um=args.bin_um, pixel_size_from=args.pixel_size_from)
    if args.visium_hd:
        spot_um = float(sample.adata.uns["visium_hd"]["bin_um"])
    return sample, spot_um


def read_gene_file(path: str | Path) -> list[str]:
    """Genes of a panel file: one per line (commas/whitespace also separate), '#' starts a comment."""
    path = require_path(path, "gene panel file")
    genes = [g for line in path.read_text().splitlines() for g in line.split("#")[0].replace(",", " ").split()]
    if not genes:
        raise InputError(f"{path}: the gene panel file lists no genes")
    return genes
