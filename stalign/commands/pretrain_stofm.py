"""``stalign pretrain-stofm --config configs/stofm_*.yaml``: SToFM's MCM + PDR pretraining (see ``stofm.pretrain``)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from stofm.pretrain import add_arguments

    p = sub.add_parser("pretrain-stofm", help="pretrain the SToFM gene/spatial encoder (MCM + PDR) on AnnData slides")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stofm.pretrain import run_from_args

    return run_from_args(args)
