"""``stalign train --config configs/<name>.yaml [key=value ...] [--flags] [--resume [CKPT]]``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from stalign.training.config import add_config_flags

    p = sub.add_parser(
        "train", help="train an stalign model (accelerate: `accelerate launch -m stalign train ...` for many GPUs)",
        description="Train image<->expression alignment from `stalign prep` shards. Settings come from the YAML "
                    "config, then --flags, then key=value overrides (e.g. max_steps=200 model_overrides.depth=2).")
    p.add_argument("--config", default=None,
                   help="YAML run config: a path, or the name of a shipped one (demo, hest_uni, ...; --list-configs)")
    p.add_argument("--list-configs", action="store_true", help="list the run configs shipped with stalign and exit")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from the newest checkpoint of output_dir (or from the step_N folder given)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_config_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from stalign.training.config import flags_from_args, resolve_config
    from stalign.training.trainer import train

    if args.list_configs:
        from stalign.training.config import CONFIG_DIR, shipped_configs

        for name, about in shipped_configs().items():
            print(f"{name:16s} {about}")
        print(f"(in {CONFIG_DIR}; use --config NAME)")
        return 0
    overrides, resume = list(args.overrides), args.resume
    if resume and "=" in resume and not Path(resume).exists():  # `--resume key=value`: the override, not a path
        overrides, resume = [resume, *overrides], "latest"
    cfg = resolve_config(args.config, overrides=overrides, flags=flags_from_args(args))
    result = train(cfg, resume=resume)
    if result.checkpoint is None:
        print(f"stopped at step {result.step}; continue with --resume", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``stalign train`` with ``argv`` (what comes after ``train``); returns the exit code."""
    from stalign.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # pragma: no cover - `accelerate launch -m stalign.commands.train ...`
    sys.exit(main())
