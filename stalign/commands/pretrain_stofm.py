"""``stalign pretrain-stofm --config configs/stofm_*.yaml``: SToFM's MCM + PDR pretraining (see ``stofm.pretrain``);
unlike ``stofm pretrain`` it resolves ``fetch:<data set>/<file>`` entries through stalign's data cache."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from stofm.pretrain import add_arguments

    p = sub.add_parser("pretrain-stofm", help="pretrain the SToFM gene/spatial encoder (MCM + PDR) on AnnData slides")
    add_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stalign.data.fetch import resolve_data_path
    from stofm.pretrain import run_from_args

    return run_from_args(args, resolve_path=resolve_data_path)
