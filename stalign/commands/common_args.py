"""Command-line options and their readers shared by several commands (``predict``, ``retrieve``, ``fewshot``,
``bench``, ``prep``, ``data``): a slide's crops, the reference bank's search engine, batch/workers/device/seed/quiet/debug,
a gene panel file."""
from __future__ import annotations

import argparse
from pathlib import Path

from stofm.util.errors import InputError


def add_slide_args(p: argparse.ArgumentParser) -> None:
    """Options shared by the commands that read crops from a slide."""
    p.add_argument("--slide", required=True, help="whole-slide image (any openslide format) or plain image")
    p.add_argument("--um-per-px", type=float, default=None,
                   help="pixel size in µm/px (needed for plain images without metadata; overrides metadata)")
    p.add_argument("--coords", default=None,
                   help="spot centres: .h5ad (obsm['spatial'], level-0 px) or CSV with x,y[,barcode] "
                        "(default: tile the tissue)")
    p.add_argument("--spot-um", type=float, default=None,
                   help="spot crop width (default: the reference bank's, else the few-shot head's, else the model's)")
    p.add_argument("--niche-um", type=float, default=None, help="niche crop width (default: as --spot-um)")
    p.add_argument("--step-um", type=float, default=None, help="tile pitch when tiling (default: the spot width)")
    p.add_argument("--resample", choices=("bilinear", "lanczos"), default=None,
                   help="crop resampling filter (default: as --spot-um; match the training data)")
    p.add_argument("--spot-diameter-um", type=float, default=None,
                   help="spot size drawn by sc.pl.spatial and the heat maps (default: the tile width when tiling; "
                        "0.55 x the spot pitch for --coords, e.g. 55 µm for Visium)")
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


def slide_coords(args: argparse.Namespace):
    """(coords, barcodes) from --coords, or (None, None) to tile the tissue."""
    if not args.coords:
        return None, None
    from stalign.tasks.predict import read_coords

    return read_coords(args.coords)


def read_gene_file(path: str | Path) -> list[str]:
    """Genes of a panel file: one per line (commas/whitespace also separate), '#' starts a comment."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gene panel file does not exist")
    genes = [g for line in path.read_text().splitlines() for g in line.split("#")[0].replace(",", " ").split()]
    if not genes:
        raise InputError(f"{path}: the gene panel file lists no genes")
    return genes
