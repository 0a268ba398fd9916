"""``stalign prep``: slides + spatial expression -> HDF5 shards + manifest.json (see docs/prep.md)."""
from __future__ import annotations

import argparse

from stalign.commands.common_args import read_gene_file
from stalign.data.crop_spec import CropSpec
from stalign.data.prep_options import (
    add_output_options,
    add_spot_geometry_options,
    crop_from_args,
    prepare_from_args,
    spot_geometry,
)
from stalign.data.sample_spec import read_sample_spec, read_sample_table
from stofm.util.errors import InputError

# = stalign.data.pixel_size.PIXEL_SIZE_CHOICES and the readers' own (not imported here: it loads openslide at
# CLI start-up)
PIXEL_SIZE_FROM = ("auto", "grid", "metadata", "spot-diameter", "pitch", "hest-estimated", "hest-embedded", "scalefactors")
TISSUE_FROM = ("auto", "in_tissue", "image")  # = stalign.data.tissue_call.TISSUE_FROM


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prep", help="crop spots/niches and write training shards",
                       description="Turn H&E slides + spatial transcriptomics into HDF5 shards and manifest.json. "
                                   "A re-run into the same --out resumes and skips finished slides.")
    src = p.add_argument_group("inputs (any mix; at least one slide)")
    src.add_argument("--h5ad", action="append", default=None, metavar="FILE",
                     help="AnnData with obsm['spatial'] in level-0 px of the matching --image (repeatable, paired "
                          "in order)")
    src.add_argument("--image", action="append", default=None, metavar="FILE", help="slide image for each --h5ad")
    src.add_argument("--samples", metavar="FILE",
                     help="CSV or YAML list of slides; columns/keys: h5ad+image, or spaceranger (+image), or "
                          "hest+id, or visium_hd (+image, bin_um); optional slide_id, um_per_px")
    src.add_argument("--spaceranger", action="append", default=None, metavar="DIR",
                     help="Space Ranger output folder (repeatable)")
    src.add_argument("--visium-hd", action="append", default=None, metavar="DIR",
                     help="Visium HD Space Ranger run, outs/ or binned_outputs/square_XXXum folder (repeatable)")
    src.add_argument("--bin-um", type=int, default=None, metavar="UM",
                     help="Visium HD bin size to read (default 16 when present: the closest to a 55 µm spot)")
    src.add_argument("--hest", metavar="ROOT", help="HEST-1k folder (st/, wsis/, metadata/)")
    src.add_argument("--ids", nargs="+", metavar="ID", help="HEST sample ids (default: all in --hest)")
    add_output_options(p, gene_file=True)
    p.add_argument("--pixel-size-from", choices=PIXEL_SIZE_FROM, default="auto",
                   help="where the pixel size comes from when --um-per-px is not given (default auto: the "
                        "reader's order, docs/readers.md); every available source is recorded in the manifest")
    add_spot_geometry_options(p)
    p.add_argument("--neighbors", type=int, default=16, help="nearest spots stored per spot (default 16)")
    p.add_argument("--batch-size", type=int, default=32, help="crops read per batch (default 32)")
    p.add_argument("--tissue-from", choices=TISSUE_FROM, default="auto",
                   help="which spots are on tissue: 'in_tissue' trusts Space Ranger's call (Space Ranger folders, "
                        "HEST samples with obs in_tissue), 'image' the image tissue mask; 'auto' (default) "
                        "in_tissue where the slide has it, else the image mask. Each slide's rule, its dropped "
                        "spots and a QC picture go to --out/qc/")
    p.add_argument("--make-unique-genes", action="store_true",
                   help="suffix repeated gene names -1, -2, ... (anndata's var_names_make_unique) instead of failing")
    p.add_argument("--lock-timeout", type=float, default=None, metavar="SECONDS",
                   help="when another prep writes into --out, wait at most this long (default: until it is done)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def _loaders(args: argparse.Namespace, crop: CropSpec) -> list:
    """Zero-argument callables, one per slide, that read it (so errors name the slide's files); a spot may lie
    half a niche crop of ``crop`` outside the image."""
    from functools import partial

    from stalign.data import readers

    common = {"pixel_size_from": args.pixel_size_from, "crop_um": crop.niche_um,
              "make_unique": args.make_unique_genes}
    geom = spot_geometry(args)  # spot diameter / pitch (µm) for the pixel-size sources
    h5ads, images = args.h5ad or [], args.image or []
    if len(h5ads) != len(images):
        raise InputError(f"give one --image per --h5ad (got {len(h5ads)} --h5ad and {len(images)} --image)")
    if args.ids and not args.hest:
        raise InputError("--ids needs --hest ROOT")
    rows = [{"h5ad": h, "image": i} for h, i in zip(h5ads, images)]
    rows += [{"spaceranger": d} for d in args.spaceranger or []] + [{"visium_hd": d} for d in args.visium_hd or []]
    if args.hest:
        rows += [{"hest": args.hest, "id": sid} for sid in args.ids or readers.list_hest_samples(args.hest)]
    rows += read_sample_table(args.samples) if args.samples else []
    tissue_from = "image" if args.tissue_from == "image" else "in_tissue"  # the reader keeps Space Ranger's call
    out = [partial(read_sample_spec, row, um_per_px=args.um_per_px, bin_um=args.bin_um, tissue_from=tissue_from,
                   **geom, **common) for row in rows]
    if not out:
        raise InputError("no slides given: use --h5ad/--image, --samples, --spaceranger, --visium-hd or --hest")
    return out


def run(args: argparse.Namespace) -> int:
    genes = read_gene_file(args.genes) if args.genes else None
    crop = crop_from_args(args)
    samples = [load() for load in _loaders(args, crop)]
    prepare_from_args(samples, args, crop=crop, genes=genes, n_neighbors=args.neighbors, tissue_from=args.tissue_from,
                      batch_size=args.batch_size, log=_log, lock_timeout=args.lock_timeout)
    return 0


def _log(msg: str) -> None:
    import sys

    from tqdm.auto import tqdm

    tqdm.write(msg, file=sys.stderr)
