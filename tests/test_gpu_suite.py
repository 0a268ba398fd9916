"""benchmarks/gpu_suite.sh: the one GPU script runs end to end on the CPU with --dry-run and writes one results file
with a section per step (device, image encoders, training step, input pipeline, WSI prediction, retrieval, stofm
embedding, feature store, pytest -m gpu: the `## NAME` headings gpu_suite.sh writes, steps 1-7 with 3b and 6b)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ("device", "image encoders", "training step", "input pipeline", "WSI prediction", "retrieval",
         "stofm embedding", "feature store", "pytest -m gpu")


@pytest.mark.slow
def test_gpu_suite_dry_run_writes_every_section(tmp_path, subprocess_env):
    out = tmp_path / "gpu_results.md"
    env = {**subprocess_env, "PY": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "dry run on the CPU" in text and "- total:" in text
    for name in STEPS:
        assert f"## {name}\n" in text, name
    positions = [text.index(f"## {name}\n") for name in STEPS]
    assert positions == sorted(positions)  # in the order of the script's steps
    # the benchmarks' own sections of steps 3b and 6b (benchmarks/loader.py, benchmarks/feature_store.py)
    assert "## training input pipeline on CPU" in text and "pairs/s, augmented to" in text
    assert "## Feature store: second bench run and training from stored features" in text
    assert "FAILED" not in text and "TIMED OUT" not in text, text[-3000:]
    # the benchmarks appended their own sections (machine, command, table) to the same file
    assert text.count("| --- |") >= 5
    assert os.path.getsize(out) > 2000


def test_gpu_suite_rejects_unknown_options(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--bogus"], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr
