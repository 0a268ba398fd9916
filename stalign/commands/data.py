"""``stalign data fetch NAME`` and ``stalign data synth ...``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch real demo data or generate synthetic slides")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser("fetch", help="download + verify a data set into the cache (works offline once cached)")
    f.add_argument("name", help="data set name (see `stalign data fetch --list`)", nargs="?")
    f.add_argument("--list", action="store_true", help="list the known data sets")
    f.add_argument("--dest", default=None, help="folder to extract into (default: the cache)")
    f.add_argument("--force", action="store_true", help="download again even when cached")
    f.set_defaults(func=_fetch)


def _fetch(args: argparse.Namespace) -> int:
    from data_prep.fetch import DATASETS, fetch

    if args.list or not args.name:
        for name, spec in DATASETS.items():
            print(f"{name:22s} {spec.requirement:42s} {spec.description}")
        return 0
    path = fetch(args.name, root=args.dest, force=args.force)
    print(path)
    return 0
