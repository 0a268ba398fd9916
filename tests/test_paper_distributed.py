"""The paper objective on 2 CPU processes (gloo, ``accelerate launch``) equals one process holding the same global
batch: every spot's negatives are drawn by (seed, epoch, spot), rows are independent, DDP averages the gradients."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# No dropout and no BatchNorm (both image encoders the tiny ViT), so the forward does not depend on the split.
MODEL = {"dropout": 0.0, "niche_image": {"spec": "timm:test_vit", "kwargs": {"img_size": 32}}}
KEYS = ["max_steps=3", "warmup_steps=1", "lr=1e-3", "eval_every=0", "save_every=0", "log_every=1", "augment=true",
        "cpu=true", "hard_negative_clusters=4", "progress=false", f"model_overrides={json.dumps(MODEL)}"]


def _losses(path: Path) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(path.open())]


@pytest.mark.slow
def test_paper_objective_on_two_cpu_processes_matches_one_process(small_shards, tmp_path, two_process_train):
    from safetensors.torch import load_file

    from stalign.commands.train import main

    shards, two, one = small_shards("squidpy"), tmp_path / "two", tmp_path / "one"
    output = two_process_train(
        ["--config", "paper_tiny", f"data={shards}", f"output_dir={two}", "batch_size=4", *KEYS], timeout=300)
    assert "global batch 8 on 2 process(es) [DistributedType.MULTI_CPU]" in output

    assert main(["--config", "paper_tiny", f"data={shards}", f"output_dir={one}", "batch_size=8", *KEYS]) == 0
    assert _losses(two / "train_log.csv") == pytest.approx(_losses(one / "train_log.csv"), abs=1e-5)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (two, one))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
