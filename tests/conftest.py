"""Shared fixtures: real data locations and device markers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def squidpy_crop() -> Path:
    """Folder with the real Visium crop (test_data.h5ad, test_img.jpg)."""
    from stalign.data.fetch import squidpy_crop_dir

    return squidpy_crop_dir()


@pytest.fixture(scope="session")
def fetched():
    """``fetched(name)`` -> folder of a data set from ``stalign.data.fetch.DATASETS`` (downloaded once, cached)."""
    from stalign.data.fetch import fetch

    return fetch


@pytest.fixture()
def subprocess_env() -> dict:
    """Environment for child processes that must import this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture()
def two_process_train(subprocess_env):
    """``two_process_train(train_args, timeout)`` -> the output of ``stalign train TRAIN_ARGS`` on 2 CPU processes
    (``accelerate launch``, gloo); the launcher and both workers are killed and the test fails on a timeout."""
    import signal
    import socket
    import subprocess
    import sys

    def run(train_args: list[str], timeout: float) -> str:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "stalign", "train", *train_args]
        env = {**subprocess_env, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
            output, _ = proc.communicate()
            pytest.fail(f"2-process run timed out:\n{output[-3000:]}")
        assert proc.returncode == 0, output[-5000:]
        return output

    return run


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory, squidpy_crop):
    """``small_shards(name)`` -> a ``stalign prep`` folder at 32 px (64 HVG genes), made once per session:
    ``"squidpy"`` (the real Visium crop, 49 spots) or ``"synthetic"`` (one 300-spot synthetic slide)."""
    made: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in made:
            from stalign.data.crop_spec import CropSpec
            from stalign.data.pipeline import prepare
            from stalign.data.readers import read_anndata_image

            root = tmp_path_factory.mktemp(f"shards_{name}")
            if name == "squidpy":
                sample = read_anndata_image(squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg")
            elif name == "synthetic":
                from stalign.lab.synth import make_synthetic_slide

                slide = make_synthetic_slide(root / "raw", n_spots=300, progress=False)
                sample = read_anndata_image(slide.paths["adata"], slide.paths["image"])
            else:
                raise ValueError(f"unknown small_shards data set {name!r}")
            prepare([sample], root / "shards", n_top_genes=64, crop=CropSpec(patch_px=32), progress=False)
            made[name] = root / "shards"
        return made[name]

    return make


@pytest.fixture(scope="session")
def predict_setup(tmp_path_factory, squidpy_crop):
    """The real crop prepared at 32 px, a tiny model saved as a checkpoint, and the shard (test_predict*)."""
    import torch

    import stalign
    from stalign.cli import main
    from stalign.data.shards import read_shard
    from stalign.models.factory import save_checkpoint

    root = tmp_path_factory.mktemp("predict")
    shards = root / "shards"
    assert main(["prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
                 "--out", str(shards), "--n-top-genes", "20", "--patch-px", "32", "--quiet"]) == 0
    manifest = json.loads((shards / "manifest.json").read_text())
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=manifest["genes"])
    ckpt = save_checkpoint(model, root / "ckpt")
    shard = read_shard(shards / manifest["slides"][0]["shard"])
    return {"shard": shard, "root": root, "shards": shards, "manifest": manifest,
            "model": stalign.load_checkpoint(ckpt), "ckpt": ckpt, "image": squidpy_crop / "test_img.jpg", "h5ad": squidpy_crop / "test_data.h5ad"}


@pytest.fixture()
def one_line(capsys):
    """``one_line(argv, *needles, program="stalign")``: run a ``stalign`` (or ``stofm``) command line; assert exit 1,
    one line on stderr, no traceback and every needle in that line; returns the line."""

    def run(argv: list[str], *needles: str, program: str = "stalign") -> str:
        from stalign.cli import main as stalign_main
        from stofm.cli import main as stofm_main

        capsys.readouterr()
        rc = (stalign_main if program == "stalign" else stofm_main)(argv)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert rc == 1, err
        assert "Traceback" not in err and len(lines) == 1, err
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
        return lines[0]

    return run
