"""``stalign push CKPT --repo org/name``: share a trained checkpoint on the Hugging Face hub (with its model card);
others load it with ``stalign.load_checkpoint("hf-hub:org/name")`` or ``--model hf-hub:org/name``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint folder (config, weights, model card) to the Hugging Face hub")
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/mine/final)")
    p.add_argument("--repo", required=True, help="hub repo id, org/name")
    p.add_argument("--public", action="store_true", help="make the repo public (default private)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stalign.models.hub import push_to_hub

    url = push_to_hub(args.checkpoint, args.repo, private=not args.public)
    print(f"{args.checkpoint} -> {url} (load with stalign.load_checkpoint('hf-hub:{args.repo}'))")
    return 0
