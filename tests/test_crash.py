"""Crash suite: real `stalign prep` and `stalign train` processes killed (SIGKILL) or stopped (SIGTERM) by PID at
several points, then run again. Outputs equal an uninterrupted run's; no worker process, resource tracker or
temporary file is left behind. The slower cases are marked ``slow``; one kill-and-resume for prep and one for
train stay in the default run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import psutil
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARD_KEYS = ("spot_patches", "niche_patches", "expr", "niche_expr", "coords_px", "coords_um", "neighbors", "padded")


@pytest.fixture(scope="module")
def slides(tmp_path_factory, squidpy_crop):
    """The crop, its mirror and its upside-down copy: three slides so a run is caught between them."""
    import anndata as ad

    d = tmp_path_factory.mktemp("crash_slides")
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    a = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    out = [("crop", squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg")]
    for name, flip, sign in (("mirror", img[:, ::-1], [-1, 1]), ("upside", img[::-1], [1, -1])):
        Image.fromarray(np.ascontiguousarray(flip)).save(d / f"{name}.png")
        b = a.copy()
        b.obsm["spatial"] = a.obsm["spatial"] * sign + [img.shape[1] if sign[0] < 0 else 0,
                                                        img.shape[0] if sign[1] < 0 else 0]
        b.write_h5ad(d / f"{name}.h5ad")
        out.append((name, d / f"{name}.h5ad", d / f"{name}.png"))
    return out


def _prep_cmd(slides, out: Path, workers: int) -> list[str]:
    cmd = [sys.executable, "-m", "stalign", "prep", "--out", str(out), "--n-top-genes", "10", "--um-per-px", "1",
           "--spot-um", "64", "--niche-um", "300", "--patch-px", "160", "--workers", str(workers), "--quiet",
           "--batch-size", "4"]
    for _, h5ad, image in slides:
        cmd += ["--h5ad", str(h5ad), "--image", str(image)]
    return cmd


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.01)
    assert proc.poll() is None, f"the process ended before the point to kill it at: {proc.stderr.read()[-2000:]}"


def _shards_equal(a: Path, b: Path) -> None:
    names = sorted(p.name for p in (a / "shards").glob("*.h5"))
    assert names == sorted(p.name for p in (b / "shards").glob("*.h5")) and names
    for name in names:
        with h5py.File(a / "shards" / name) as fa, h5py.File(b / "shards" / name) as fb:
            for key in SHARD_KEYS:
                np.testing.assert_array_equal(fa[key][()], fb[key][()], err_msg=f"{name} {key}")
    ma, mb = (__import__("json").loads((p / "manifest.json").read_text()) for p in (a, b))
    assert [s["slide_id"] for s in ma["slides"]] == [s["slide_id"] for s in mb["slides"]] and ma["genes"] == mb["genes"]


def _gone(pids: list[int], timeout: float = 15) -> list[int]:
    deadline = time.time() + timeout
    alive = pids
    while time.time() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.1)
    return alive


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slides, subprocess_env_module):
    out = tmp_path_factory.mktemp("uninterrupted")
    res = subprocess.run(_prep_cmd(slides, out, 1), env=subprocess_env_module, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def subprocess_env_module() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _tmp_shards(out: Path) -> list[Path]:
    return list((out / "shards").glob(".*.tmp")) if (out / "shards").is_dir() else []


def _start_prep_with_workers(slides, out: Path, env: dict) -> tuple[subprocess.Popen, list[int]]:
    """A `stalign prep --workers 2` process, returned once it writes a temporary shard with its workers running."""
    proc = subprocess.Popen(_prep_cmd(slides, out, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    parent = psutil.Process(proc.pid)
    _wait_for(lambda: bool(_tmp_shards(out)) and len(parent.children(recursive=True)) >= 2, proc)
    return proc, [c.pid for c in parent.children(recursive=True)]


def test_prep_killed_with_two_workers_leaves_no_process_and_resumes_identically(tmp_path, slides, reference,
                                                                                 subprocess_env_module):
    """kill -9 of the parent while two crop workers read: the workers and the resource tracker end with it;
    the re-run skips finished slides and the shards equal an uninterrupted run's."""
    out = tmp_path / "out"
    proc, children = _start_prep_with_workers(slides, out, subprocess_env_module)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not _gone(children), "worker processes outlived the killed prep"
    rerun = subprocess.run(_prep_cmd(slides, out, 2), env=subprocess_env_module, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert not _tmp_shards(out)
    _shards_equal(out, reference)


def test_prep_sigterm_removes_its_temporaries_and_workers(tmp_path, slides, reference, subprocess_env_module):
    out = tmp_path / "out"
    proc, children = _start_prep_with_workers(slides, out, subprocess_env_module)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not _tmp_shards(out), "a SIGTERM left a temporary shard"
    assert not _gone(children)
    rerun = subprocess.run(_prep_cmd(slides, out, 1), env=subprocess_env_module, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    _shards_equal(out, reference)


@pytest.mark.slow
@pytest.mark.parametrize("when", ["first_shard", "manifest"])
def test_prep_killed_at_other_points_resumes_identically(tmp_path, slides, reference, subprocess_env_module, when):
    out = tmp_path / "out"
    proc = subprocess.Popen(_prep_cmd(slides, out, 1), env=subprocess_env_module, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    point = {"first_shard": lambda: bool(list((out / "shards").glob("*.h5"))) if (out / "shards").is_dir() else False,
             "manifest": lambda: (out / "manifest.json").is_file()}[when]
    _wait_for(point, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = subprocess.run(_prep_cmd(slides, out, 1), env=subprocess_env_module, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    _shards_equal(out, reference)


def _train_cmd(shards: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "stalign", "train", "--config", str(REPO / "configs" / "tiny_test.yaml"),
            f"data={shards}", f"output_dir={out}", "max_steps=40", "save_every=4", "keep_checkpoints=0",
            "eval_every=0", *extra]


def _final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "final" / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGKILL, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_train_killed_after_a_checkpoint_resumes_to_the_same_weights(tmp_path, small_shards, subprocess_env_module,
                                                                     sig):
    shards = small_shards("squidpy")
    whole = subprocess.run(_train_cmd(shards, tmp_path / "whole"), env=subprocess_env_module, capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(shards, out), env=subprocess_env_module, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: (out / "checkpoints" / "step_8" / "trainer_state.json").is_file(), proc)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    assert not (out / "final").exists(), "the run finished before it was stopped"
    again = subprocess.run(_train_cmd(shards, out, "--resume"), env=subprocess_env_module, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stdout + again.stderr
    a, b = _final_weights(tmp_path / "whole"), _final_weights(out)
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    steps = [int(r.split(",")[0]) for r in (out / "train_log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 41))


def test_a_sigterm_lost_in_a_weakref_callback_still_stops_the_prep(tmp_path, slides, monkeypatch):
    """Python prints and drops an exception raised inside a weakref callback or ``__del__``: when the SIGTERM
    handler's exception lands there (garbage collection of a finished future), the prep must still stop at its
    next batch, remove its temporary shard and report the signal."""
    import weakref

    from stalign.data import pipeline, prep_signals, shards
    from stalign.data.crop_spec import CropSpec
    from stalign.data.readers import read_anndata_image

    class Anything:
        pass

    calls = []
    write = shards.ShardWriter.write_compressed

    def write_then_lose_a_sigterm(self, *args):
        write(self, *args)
        calls.append(1)
        if len(calls) == 2:
            obj = Anything()
            weakref.finalize(obj, prep_signals.raise_terminated, signal.SIGTERM, None)
            del obj  # the handler runs in the finalizer: its exception is printed and ignored

    monkeypatch.setattr(shards.ShardWriter, "write_compressed", write_then_lose_a_sigterm)
    samples = [read_anndata_image(h5ad, image, slide_id=name, um_per_px=1.0) for name, h5ad, image in slides]
    with pytest.raises(SystemExit) as stop:
        pipeline.prepare(samples, tmp_path / "out", n_top_genes=10, crop=CropSpec(spot_um=64, niche_um=300, patch_px=32),
                         batch_size=4, progress=False)
    assert stop.value.code == 128 + signal.SIGTERM and len(calls) == 2
    assert not _tmp_shards(tmp_path / "out") and not list((tmp_path / "out" / "shards").glob("*.h5"))
