"""The entry-point scripts in ``data_prep/`` run as a researcher runs them (``python data_prep/X.py``) on the demo
data, write shards that ``ShardDataset`` reads, and fail with one line on bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from stalign.data.dataset import ShardDataset

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--patch-px", "32", "--n-top-genes", "20", "--quiet"]


def _script(name: str, *args: str, env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO / "data_prep" / name), *map(str, args)], capture_output=True,
                         text=True, env=env, timeout=600)
    if ok:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_every_script_is_tested_here():
    scripts = sorted(p.name for p in (REPO / "data_prep").glob("*.py"))
    assert scripts == ["fetch_demo_data.py", "prepare_hest_subset.py", "prepare_spaceranger.py",
                       "prepare_visium_image.py"]


def test_fetch_demo_data_prints_the_cached_folder(subprocess_env, fetched):
    res = _script("fetch_demo_data.py", "squidpy-spaceranger", env=subprocess_env)
    assert res.stdout.strip() == f"squidpy-spaceranger: {fetched('squidpy-spaceranger')}"
    assert "squidpy-visium-crop" in _script("fetch_demo_data.py", "--list", env=subprocess_env).stdout
    _one_line_error(_script("fetch_demo_data.py", "nonsense", env=subprocess_env, ok=False), "unknown data set")


def test_prepare_visium_image_on_the_demo_crop(squidpy_crop, tmp_path, subprocess_env):
    out = tmp_path / "crop"
    res = _script("prepare_visium_image.py", squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg",
                  "--out", out, *SMALL, env=subprocess_env)
    assert "20 genes (as_given), 49 spots ->" in res.stdout and "test_data" in res.stdout
    ds = ShardDataset(out)
    assert len(ds) == 49 and len(ds.genes) == 20 and ds[0]["spot_image"].shape == (3, 32, 32)
    bad = _script("prepare_visium_image.py", squidpy_crop / "test_data.h5ad", "--out", tmp_path / "x",
                  env=subprocess_env, ok=False)
    _one_line_error(bad, "H5AD IMAGE pairs")
    assert not (tmp_path / "x").exists()


def test_prepare_spaceranger_on_the_demo_folder(fetched, tmp_path, subprocess_env):
    folder = fetched("squidpy-spaceranger")
    out = tmp_path / "sr"
    # the folder's lowres image is 4 px per spot, too coarse for the tissue mask: keep every spot
    res = _script("prepare_spaceranger.py", folder, "--out", out, "--no-tissue-filter", *SMALL, env=subprocess_env)
    assert "100 spots ->" in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    slide = manifest["slides"][0]
    assert slide["n_spots"] == 100 and slide["n_background_dropped"] == 0 and "scalef" in slide["pixel_size_source"]
    assert len(ShardDataset(out)) == 100
    _one_line_error(_script("prepare_spaceranger.py", tmp_path / "nowhere", "--out", tmp_path / "y",
                            env=subprocess_env, ok=False), "nowhere")


def test_prepare_hest_subset_on_a_hest_folder_of_the_demo_crop(squidpy_crop, tmp_path, subprocess_env):
    from stalign.data.slide import write_pyramidal_tiff

    root = tmp_path / "hest"
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True)
    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    del adata.uns["spatial"]
    image = np.asarray(Image.open(squidpy_crop / "test_img.jpg"))
    for sid, organ in (("TENX0", "Brain"), ("TENX1", "Kidney")):
        write_pyramidal_tiff(root / "wsis" / f"{sid}.tif", image, um_per_px=0.6, tile=128)
        adata.write_h5ad(root / "st" / f"{sid}.h5ad")
        (root / "metadata" / f"{sid}.json").write_text(json.dumps({"pixel_size_um_estimated": 0.615,
                                                                    "organ": organ}))
    out = tmp_path / "brain"
    res = _script("prepare_hest_subset.py", root, "--organ", "brain", "--out", out, *SMALL, env=subprocess_env)
    assert "0.6150" in res.stdout and "49 spots ->" in res.stdout and "TENX1" not in res.stdout
    assert [s["slide_id"] for s in json.loads((out / "manifest.json").read_text())["slides"]] == ["TENX0"]
    res = _script("prepare_hest_subset.py", root, "--ids", "TENX0", "TENX1", "--out", tmp_path / "both", *SMALL,
                  env=subprocess_env)
    assert len(ShardDataset(tmp_path / "both")) == 98
    _one_line_error(_script("prepare_hest_subset.py", root, "--ids", "TENX9", "--out", tmp_path / "z",
                            env=subprocess_env, ok=False), "TENX9")


@pytest.mark.parametrize("script", ["prepare_visium_image.py", "prepare_spaceranger.py", "prepare_hest_subset.py"])
def test_scripts_show_their_usage(script, subprocess_env):
    res = _script(script, "--help", env=subprocess_env)
    assert "--out" in res.stdout and "usage:" in res.stdout
