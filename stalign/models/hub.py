"""stalign checkpoints on the Hugging Face hub: a checkpoint folder (``config.json`` + ``model.safetensors``) plus a
model card (``README.md``: panel, encoders, training data, metrics); ``load_checkpoint("hf-hub:org/name[@rev]")``
reads it through the hub cache (``HF_HUB_OFFLINE=1`` works once cached) and ``push_to_hub`` uploads one."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError
from stofm.util.output_paths import safe_name

HUB_PREFIX = "hf-hub:"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "README.md")


def model_card(model: Any, *, training: dict[str, Any] | None = None) -> str:
    """A Hugging Face model card for an stalign model: YAML front matter, then what it is and how to use it."""
    cfg = model.config
    training = training or {}
    genes = list(model.genes)
    metrics = training.get("metrics") or {}
    lines = ["---", "library_name: stalign", "tags:", "- spatial-transcriptomics", "- histopathology",
             "- st-align", "- stofm", "---", "", f"# stalign model `{model.meta.get('name') or 'stalign'}`", "",
             "Aligns H&E spot and niche crops with spatial gene expression (ST-Align with a SToFM gene encoder); "
             "predicts expression from H&E alone by retrieval from a reference or with a few-shot head.", "",
             "| | |", "| --- | --- |",
             f"| spot image encoder | `{cfg.spot_image.spec}` |", f"| niche image encoder | `{cfg.niche_image.spec}` |",
             f"| gene encoder | `{cfg.gene.encoder}` (niche: `{cfg.gene.niche}`) |",
             f"| embedding | {cfg.embed_dim}-d |",
             f"| gene panel | {len(genes)} genes: {', '.join(genes[:20])}{' ...' if len(genes) > 20 else ''} |"]
    for key in ("data", "steps", "spots", "best_step"):
        if training.get(key) is not None:
            lines.append(f"| training {key} | {training[key]} |")
    for key, value in metrics.items():
        lines.append(f"| held-out {key} | {value:.4g} |" if isinstance(value, (int, float)) else f"| {key} | {value} |")
    lines += ["", "```python", "import stalign", 'model = stalign.load_checkpoint("hf-hub:<org>/<name>")',
              "```", "", "Use the gene panel above: shards prepared with `stalign prep --genes panel.txt`.", ""]
    return "\n".join(lines)


def check_hub_spec(spec: str, repo: str, revision: str) -> None:
    """``org/name`` and each ``/``-part of a revision (``main``, a commit, ``refs/pr/1``) must be plain names: the
    hub cache makes folders of them, and ``..`` would lead out of it."""
    parts = repo.split("/")
    if len(parts) != 2:
        raise InputError(f"{spec}: a hub checkpoint is hf-hub:ORG/NAME[@REVISION], got repo {repo!r}")
    for part in parts:
        safe_name(part, "hub repo part", source=spec)
    for part in revision.split("/") if revision else ():
        safe_name(part, "hub revision part", source=spec)


def resolve_hub_checkpoint(spec: str) -> Path:
    """The local folder of ``hf-hub:org/name[@revision]`` (downloaded once, then from the cache)."""
    from huggingface_hub import snapshot_download

    from stalign.models.backbones import hub_errors

    repo, _, revision = spec[len(HUB_PREFIX):].partition("@")
    check_hub_spec(spec, repo, revision)
    with hub_errors(spec):
        folder = snapshot_download(repo, revision=revision or None, allow_patterns=list(CHECKPOINT_FILES))
    return Path(folder)


def push_to_hub(checkpoint: str | os.PathLike, repo_id: str, *, private: bool = True, token: str | None = None,
                commit_message: str = "stalign checkpoint") -> str:
    """Upload a checkpoint folder (``config.json``, ``model.safetensors``, ``README.md``) to ``repo_id``; returns the
    repo URL. Log in first (``hf auth login``) or pass ``token``."""
    from huggingface_hub import HfApi

    from stalign.models.backbones import hub_errors

    folder = Path(checkpoint)
    missing = [f for f in CHECKPOINT_FILES[:2] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: not an stalign checkpoint folder (lacks {missing})")
    api = HfApi(token=token)
    with hub_errors(f"{HUB_PREFIX}{repo_id}", upload=True):
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=list(CHECKPOINT_FILES),
                          commit_message=commit_message)
    return str(url)
