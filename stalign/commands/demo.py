"""``stalign demo`` (``make demo``): the whole job end to end on real data, in stages, printing a result table.

    stalign demo [--out runs/demo] [--stages fetch,prep,train,evaluate,predict,ablation] [--synth-spots 1000]

The stages live in ``stalign.lab.demo_stages``; this module parses the options, runs the chosen stages in
order under a header with their elapsed time, prints the tables and writes ``<out>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stalign.commands.text_table import format_table
from stalign.lab import demo_ablation  # noqa: F401  (registers the ablation stage after the others)
from stalign.lab.demo_stages import STAGES, DemoContext
from stofm.util.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options (``stalign demo`` and ``python -m stalign.commands.demo``)."""
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--synth-spots", type=int, default=1000, help="spots of the synthetic slide")
    p.add_argument("--synth-um-per-px", type=float, default=0.5, help="pixel size of the synthetic slide")
    p.add_argument("--n-top-genes", type=int, default=50, help="gene panel: top-N highly variable genes")
    p.add_argument("--pixel-size-from", choices=("auto", "spot-diameter", "pitch"), default="auto",
                   help="pixel size of the real crop: metadata, else the Visium spot diameter (auto), or the pitch")
    p.add_argument("--patch-px", type=int, default=224, help="crop size in px of the prepared shards")
    p.add_argument("--config", default="configs/demo.yaml", help="training config of the train stage")
    p.add_argument("--train-steps", type=int, help="optimizer steps of the train stage (default: the config's)")
    p.add_argument("--split-by", choices=("block", "spot", "slide"),
                   help="held-out spots of the train stage (default: the config's, block)")
    p.add_argument("--crop-config", default="configs/demo_crop.yaml", help="training config of each crop fold")
    p.add_argument("--crop-steps", type=int, help="optimizer steps per crop fold (default: the config's)")
    p.add_argument("--crop-folds", type=int, default=5, help="spatial folds of the real crop")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the configs')")
    p.add_argument("--threads", type=int, help="torch CPU threads for training (default: the configs')")
    p.add_argument("--k", type=int, default=10, help="reference spots averaged by zero-shot retrieval")
    p.add_argument("--heatmap-genes", type=int, default=3, help="genes drawn as heat maps")
    p.add_argument("--ablation-spots", type=int, default=400, help="spots per synthetic slide of the ablation stage")
    p.add_argument("--ablation-steps", type=int, default=60, help="optimizer steps per arm of the ablation stage")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="the whole job end to end on real data (make demo), printing result tables")
    add_arguments(d)
    d.set_defaults(func=run)


def _stage_names(stages: str) -> list[str]:
    names = [s.strip() for s in stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise InputError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="stalign demo", description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        _stage_names(args.stages)
    except ValueError as err:
        p.error(str(err))
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run the selected stages in order and print the result tables."""
    names = _stage_names(args.stages)
    ctx = DemoContext(out=args.out, args=args)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for name in (n for n in STAGES if n in names):
        print(f"\n=== stage {name} {'=' * max(3, 60 - len(name))}", flush=True)
        t0 = time.perf_counter()
        STAGES[name](ctx)
        ctx.seconds[name] = time.perf_counter() - t0
        print(f"--- {name} done in {ctx.seconds[name]:.1f} s", flush=True)
    total = time.perf_counter() - t_all
    ctx.rows["time"] = [{**{k: f"{v:.1f} s" for k, v in ctx.seconds.items()}, "all": f"{total:.1f} s"}]
    print(f"\n=== results ({total:.1f} s in all) {'=' * 30}")
    for table, rows in ctx.rows.items():
        print(f"\n[{table}]\n{format_table(rows)}")
        for line in ctx.notes.get(table, []):
            print(f"  {line}")
    summary = {"stages": ctx.seconds, "tables": ctx.rows, "notes": ctx.notes}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\nsummary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
