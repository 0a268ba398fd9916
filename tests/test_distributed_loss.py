"""The all-gather contrastive loss in a real 2-process CPU (gloo) run launched by ``accelerate launch``:
the rank-averaged loss and gradients equal one process computing the same global batch."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_loss_and_gradients_match_single_process(tmp_path: Path, subprocess_env: dict) -> None:
    out = tmp_path / "dist.json"
    # accelerate 1.x: ``--cpu`` with several processes falls back to its single-process launcher, while
    # ``--multi_gpu`` runs torch.distributed.run, which on a CPU-only machine gives CPU processes (gloo).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "_dist_loss_worker.py"), str(out)]
    env = dict(subprocess_env, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world_size"] == 2
    assert [(r["kind"], r["sizes"]) for r in res["results"]] == [("infonce", [4, 4]), ("infonce", [3, 5]),
                                                                    ("siglip", [5, 3])]
    for r in res["results"]:
        # spot, niche, fusion and total loss: mean over ranks == single process on the global batch
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5, abs=1e-6), r
        assert r["max_grad_diff"] <= 1e-5 * max(1.0, r["max_grad"]), r
        assert r["local_loss_differs"]  # each rank's own loss is not the global one: the gather matters
