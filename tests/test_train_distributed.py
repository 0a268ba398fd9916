"""``accelerate launch`` of ``stalign train`` on 2 CPU processes (gloo, MULTI_CPU) equals one process holding the
same global batch: per-step losses, final weights and the gathered validation metrics.

(``accelerate launch --cpu --num_processes 2`` needs MPI; ``--multi_gpu`` starts torch.distributed.run workers and
``cpu=true`` in the run config makes them CPU/gloo processes, which works without any GPU.)
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Exact equality needs a model whose forward does not depend on how the batch is split: no dropout (per-process
# RNG streams) and no BatchNorm (per-process batch statistics), so both image encoders are the tiny ViT.
MODEL = {"dropout": 0.0, "niche_image": {"spec": "timm:test_vit", "kwargs": {"img_size": 32}}}
KEYS = ["max_steps=4", "warmup_steps=1", "lr=1e-3", "eval_every=2", "save_every=0", "log_every=1", "augment=true",
        "cpu=true", f"model_overrides={json.dumps(MODEL)}"]


def _csv(path: Path) -> list[dict[str, float]]:
    return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(path.open())]


def test_accelerate_launch_two_cpu_processes_match_one_process_on_the_same_global_batch(small_shards, tmp_path,
                                                                                       two_process_train):
    from safetensors.torch import load_file

    from stalign.commands.train import main

    shards, two, one = small_shards("squidpy"), tmp_path / "two", tmp_path / "one"
    output = two_process_train(
        ["--config", "configs/tiny_test.yaml", f"data={shards}", f"output_dir={two}", "batch_size=4", *KEYS], timeout=240)
    assert "global batch 8 on 2 process(es) [DistributedType.MULTI_CPU]" in output

    # one process with batch 8 = the 2 x 4 global batch (the seedable sampler orders the data identically)
    assert main(["--config", "configs/tiny_test.yaml", f"data={shards}", f"output_dir={one}", "batch_size=8",
                 *KEYS]) == 0
    two_log, one_log = _csv(two / "train_log.csv"), _csv(one / "train_log.csv")
    assert [r["step"] for r in two_log] == [1, 2, 3, 4]
    assert [r["loss"] for r in two_log] == pytest.approx([r["loss"] for r in one_log], abs=1e-5)
    two_val, one_val = _csv(two / "val_log.csv"), _csv(one / "val_log.csv")
    assert [r["n_spots"] for r in two_val] == [10, 10]  # gather_for_metrics drops the padding of uneven shards
    for row_two, row_one in zip(two_val, one_val, strict=True):
        assert row_two == pytest.approx(row_one, abs=1e-6)
    a, b = (load_file(str(p / "final" / "model.safetensors")) for p in (two, one))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
