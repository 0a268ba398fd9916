#!/usr/bin/env python
"""Prepare training shards from Space Ranger output folders (``outs/`` with ``filtered_feature_bc_matrix.h5``
and ``spatial/``), one slide per folder:

    python data_prep/prepare_spaceranger.py run1/outs run2/outs --out shards/visium
    python data_prep/prepare_spaceranger.py run1/outs --image run1.tif --out shards/run1   # full-res H&E

Without ``--image`` the hires (else lowres) PNG is cropped, its pixel size from ``scalefactors_json.json``.
Same pipeline as ``stalign prep --spaceranger DIR``.
"""
from __future__ import annotations

import argparse
import sys

from stalign.data.prep_options import add_output_options, prepare_from_args
from stalign.data.readers import read_spaceranger
from stofm.util.cli_errors import run_parsed
from stofm.util.errors import InputError


def run(args: argparse.Namespace) -> int:
    if args.image and len(args.folders) != 1:
        raise InputError("--image goes with exactly one Space Ranger folder")
    samples = [read_spaceranger(folder, image=args.image, um_per_px=args.um_per_px) for folder in args.folders]
    prepare_from_args(samples, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_spaceranger.py", description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="Space Ranger output folders (outs/ or its parent)")
    p.add_argument("--image", default=None, help="full-resolution H&E of the (single) folder's slide")
    add_output_options(p)
    p.set_defaults(func=run)
    return run_parsed(p, p.parse_args(argv), prog=p.prog)


if __name__ == "__main__":
    sys.exit(main())
