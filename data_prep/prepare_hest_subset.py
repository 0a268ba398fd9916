#!/usr/bin/env python
"""Prepare training shards from a HEST-1k download (``st/<id>.h5ad``, ``wsis/<id>.tif``, ``metadata/<id>.json``),
all samples or a chosen subset:

    python data_prep/prepare_hest_subset.py hest_data --ids TENX95 TENX99 --out shards/hest
    python data_prep/prepare_hest_subset.py hest_data --organ Brain --out shards/brain

The pixel size is HEST's ``pixel_size_um_estimated`` (else ``_embedded``, else the WSI metadata). Same pipeline
as ``stalign prep --hest ROOT --ids ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stalign.data.prep_options import add_output_options, prepare_from_args
from stalign.data.readers import list_hest_samples, read_hest
from stofm.util.cli_errors import run_parsed
from stofm.util.errors import InputError


def _organ(root: Path, sample_id: str) -> str:
    meta = root / "metadata" / f"{sample_id}.json"
    return str(json.loads(meta.read_text()).get("organ", "")) if meta.is_file() else ""


def run(args: argparse.Namespace) -> int:
    root = Path(args.root)
    available = list_hest_samples(root)
    ids = args.ids or available
    unknown = sorted(set(ids) - set(available))
    if unknown:
        raise FileNotFoundError(f"{root}: no HEST sample(s) {unknown} with a slide (found {available[:10]})")
    if args.organ:
        ids = [i for i in ids if _organ(root, i).lower() == args.organ.lower()]
        if not ids:
            raise InputError(f"{root}: no sample with organ {args.organ!r} in metadata/*.json")
    samples = [read_hest(root, sid, um_per_px=args.um_per_px) for sid in ids]
    prepare_from_args(samples, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="prepare_hest_subset.py", description=__doc__.splitlines()[0])
    p.add_argument("root", help="HEST-1k folder (st/, wsis/, metadata/)")
    p.add_argument("--ids", nargs="+", default=None, help="sample ids (default: every sample with a slide)")
    p.add_argument("--organ", default=None, help="only samples whose metadata 'organ' is this (e.g. Brain)")
    add_output_options(p)
    p.set_defaults(func=run)
    return run_parsed(p, p.parse_args(argv), prog=p.prog)


if __name__ == "__main__":
    sys.exit(main())
