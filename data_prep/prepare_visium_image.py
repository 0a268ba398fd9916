#!/usr/bin/env python
"""Prepare training shards from AnnData + a full-resolution H&E image (``obsm['spatial']`` in the image's pixels),
e.g. the demo's Visium crop:

    python data_prep/prepare_visium_image.py test_data.h5ad test_img.jpg --out shards/crop
    python data_prep/prepare_visium_image.py a.h5ad a.tif b.h5ad b.tif --out shards/ab --n-top-genes 100

The pixel size comes from the slide metadata, else the Visium spot diameter in ``uns['spatial']`` (never
guessed; ``--um-per-px`` overrides). Same pipeline as ``stalign prep --h5ad ... --image ...``.
"""
from __future__ import annotations

import argparse
import sys

from stalign.data.prep_options import add_output_options, prepare_from_args
from stalign.data.readers import read_anndata_image
from stofm.util.cli_errors import run_parsed
from stofm.util.errors import InputError


def run(args: argparse.Namespace) -> int:
    if len(args.pairs) % 2:
        raise InputError(f"give H5AD IMAGE pairs; got {len(args.pairs)} paths")
    pairs = list(zip(args.pairs[::2], args.pairs[1::2]))
    samples = [read_anndata_image(h5ad, image, um_per_px=args.um_per_px) for h5ad, image in pairs]
    prepare_from_args(samples, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_visium_image.py", description=__doc__.splitlines()[0])
    p.add_argument("pairs", nargs="+", metavar="H5AD IMAGE", help="AnnData file and its H&E image, repeated")
    add_output_options(p)
    p.set_defaults(func=run)
    return run_parsed(p, p.parse_args(argv), prog=p.prog)


if __name__ == "__main__":
    sys.exit(main())
