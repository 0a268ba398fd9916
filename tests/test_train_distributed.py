"""The full training step through accelerate on 2 CPU processes (gloo, MULTI_CPU) equals one process holding the
same global batch: per-step losses, final weights and the gathered validation metrics."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("stalign.models.factory")  # another developer's module; skipped only until it lands

REPO = Path(__file__).resolve().parents[1]
# Exact equality needs a model whose forward does not depend on how the batch is split: no dropout (per-process
# RNG streams) and no BatchNorm (per-process batch statistics), so both image encoders are the tiny ViT.
OVERRIDES = {"max_steps": 4, "warmup_steps": 1, "lr": 1e-3, "eval_every": 2, "save_every": 0, "augment": True,
             "cpu": True, "model_overrides": {"dropout": 0.0, "niche_image": {"spec": "timm:test_vit",
                                                                              "kwargs": {"img_size": 32}}}}


def test_two_process_gloo_run_matches_single_process_on_the_same_global_batch(small_shards, tmp_path,
                                                                              subprocess_env):
    from safetensors.torch import load_file

    from stalign.training.trainer import train_from_config

    shards = str(small_shards("squidpy"))
    two = tmp_path / "two"
    with socket.socket() as sock:  # a free port for the rendezvous (torch.distributed.run hangs on port 0)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(REPO / "tests" / "train_distributed_worker.py"), shards, str(two), "4", json.dumps(OVERRIDES)]
    env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        output, _ = proc.communicate()
        pytest.fail(f"2-process run timed out:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-5000:]
    dist = json.loads((two / "result.json").read_text())
    assert dist["num_processes"] == 2 and dist["distributed_type"] == "DistributedType.MULTI_CPU"

    # one process, batch 8 = the 2 x 4 global batch (the seedable sampler orders the data identically)
    one = train_from_config("configs/tiny_test.yaml", data=shards, output_dir=str(tmp_path / "one"), batch_size=8,
                            **OVERRIDES)
    assert [s for s, _ in dist["losses"]] == [1, 2, 3, 4]
    assert [loss for _, loss in dist["losses"]] == pytest.approx([loss for _, loss in one.losses], abs=1e-5)
    assert dist["metrics"]["n_spots"] == one.metrics["n_spots"] == 10  # gather_for_metrics drops the padding
    assert dist["metrics"] == pytest.approx(one.metrics, abs=1e-6)
    a, b = load_file(str(two / "final" / "model.safetensors")), load_file(str(tmp_path / "one" / "final" /
                                                                                "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
