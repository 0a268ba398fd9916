"""HEST-Bench task folders are checked before anything is embedded (one line naming the file for each bad case),
and a task exported from two prepared slides runs with a stalign checkpoint's image side next to a backbone."""
from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest

from stalign.data.hest_bench_io import read_patches, write_patches
from stalign.tasks.hest_bench import check_task, read_task

N, GENES = 6, ["g1", "g2", "g3"]


def _task(root: Path, n_splits: int = 2) -> Path:
    """A tiny valid task: samples A and B (N 16-px patches each), leave-one-out splits."""
    rng = np.random.default_rng(0)
    for sid in ("A", "B"):
        barcodes = [f"{sid}{i}-1" for i in range(N)]
        write_patches(root / "patches" / f"{sid}.h5", rng.integers(0, 255, (N, 16, 16, 3)), barcodes,
                      np.zeros((N, 2)))
        (root / "adata").mkdir(parents=True, exist_ok=True)
        ad.AnnData(X=rng.poisson(3, (N, 3)).astype(np.float32), obs=pd.DataFrame(index=barcodes),
                   var=pd.DataFrame(index=GENES)).write_h5ad(root / "adata" / f"{sid}.h5ad")
    (root / "var_50genes.json").write_text(json.dumps({"genes": GENES}))
    (root / "splits").mkdir(exist_ok=True)
    for i, (train, test) in enumerate((("A", "B"), ("B", "A"))[:n_splits]):
        for kind, sid in (("train", train), ("test", test)):
            _split(root, f"{kind}_{i}.csv", sid)
    return root


def _split(root: Path, name: str, sid: str) -> None:
    pd.DataFrame({"sample_id": [sid], "patches_path": [f"patches/{sid}.h5"],
                  "expr_path": [f"adata/{sid}.h5ad"]}).to_csv(root / "splits" / name, index=False)


def _replace_img(path: Path, img: np.ndarray) -> None:
    with h5py.File(path, "a") as f:
        del f["img"]
        f["img"] = img


def _one_line_error(root: Path, capsys) -> str:
    from stalign.cli import main

    assert main(["bench", "--hest-bench", str(root), "--encoders", "efficientnet-lite0", "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_a_valid_task_passes_the_checks(tmp_path):
    task = read_task(_task(tmp_path))
    info = check_task(task)
    assert sorted(info) == ["A", "B"] and len(info["A"]["barcodes"]) == N and not info["A"]["niche"]


def test_train_test_overlap_is_refused(tmp_path, capsys):
    root = _task(tmp_path)
    _split(root, "test_0.csv", "A")  # test split == train split (the 0.717-instead-of-0.384 case)
    err = _one_line_error(root, capsys)
    assert "test_0.csv" in err and f"{N} test spots are also in train_0.csv" in err


@pytest.mark.parametrize("lone", ["test_1.csv", "train_1.csv"])
def test_a_missing_split_file_is_refused(tmp_path, capsys, lone):
    root = _task(tmp_path)
    (root / "splits" / lone).unlink()
    assert f"{lone}: missing" in _one_line_error(root, capsys)


def test_a_gap_in_split_numbers_is_refused(tmp_path, capsys):
    root = _task(tmp_path)
    for kind in ("train", "test"):
        (root / "splits" / f"{kind}_0.csv").unlink()
    assert "train_0.csv: missing" in _one_line_error(root, capsys)


def test_float_patches_in_unit_range_are_read_as_such(tmp_path):
    root = _task(tmp_path)
    img = np.random.default_rng(1).random((N, 16, 16, 3)).astype(np.float32)
    _replace_img(root / "patches" / "A.h5", img)
    got, barcodes = read_patches(root / "patches" / "A.h5")
    assert got.dtype == np.float32 and np.array_equal(got, img) and len(barcodes) == N  # not cast to black uint8
    check_task(read_task(root))


@pytest.mark.parametrize("img, message", [
    (np.full((N, 16, 16, 3), 200.0, np.float32), "float32 with values in [200, 200]; float patches must lie in [0, 1]"),
    (np.zeros((N, 16, 16, 3), np.int16), "img is int16"),
    (np.zeros((N, 16, 16), np.uint8), "img has shape (6, 16, 16)"),
    (np.zeros((N - 1, 16, 16, 3), np.uint8), "img holds 5 patches but barcode 6 entries"),
])
def test_bad_patch_arrays_are_refused_by_name(tmp_path, capsys, img, message):
    root = _task(tmp_path)
    _replace_img(root / "patches" / "B.h5", img)
    err = _one_line_error(root, capsys)
    assert str(root / "patches" / "B.h5") in err and message in err


def test_nan_patches_are_refused(tmp_path, capsys):
    root = _task(tmp_path)
    img = np.full((N, 16, 16, 3), 0.5, np.float32)
    img[3, 2, 2, 1] = np.nan
    _replace_img(root / "patches" / "A.h5", img)
    err = _one_line_error(root, capsys)
    assert str(root / "patches" / "A.h5") in err and "patch 3 holds NaN" in err


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A task exported (`stalign data export-hest`) from two prepared synthetic slides, and a tiny untrained stalign
    checkpoint over their panel."""
    import torch

    import stalign
    from stalign.cli import main
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import make_synthetic_slide
    from stalign.models.factory import save_checkpoint

    tmp = tmp_path_factory.mktemp("export")
    slides = [make_synthetic_slide(tmp / "raw", n_spots=40, seed=s, progress=False) for s in (0, 1)]
    prepare([read_anndata_image(s.paths["adata"], s.paths["image"]) for s in slides], tmp / "shards",
            n_top_genes=8, crop=CropSpec(patch_px=32), progress=False)
    assert main(["data", "export-hest", str(tmp / "shards"), "--out", str(tmp / "task")]) == 0
    torch.manual_seed(0)
    genes = json.loads((tmp / "shards" / "manifest.json").read_text())["genes"]
    ckpt = save_checkpoint(stalign.create_model("stalign-tiny", genes=genes), tmp / "ckpt")
    return tmp / "task", ckpt


def test_exported_task_runs_a_stalign_checkpoint_and_a_backbone(exported, tmp_path, capsys):
    from stalign.cli import main

    task, ckpt = exported
    assert all(i["niche"] for i in check_task(read_task(task)).values())  # export writes the niche crops too
    assert main(["bench", "--hest-bench", str(task), "--encoders", f"model:{ckpt}", f"backbone:{ckpt}",
                 "efficientnet-lite0", "--latent-dim", "8", "--quiet", "--out", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert f"model:{ckpt}" in out and "spot + niche crops" in out and "row to beat" in out
    table = pd.read_csv(tmp_path / "t.csv")
    rows = table.set_index("encoder")
    assert list(table["kind"]) == ["encoder"] * 3 + ["baseline"] * 2 and table["to_beat"].sum() == 1
    for i, spec in enumerate((f"model:{ckpt}", f"backbone:{ckpt}", "efficientnet-lite0")):
        row = table.iloc[i]
        assert row["encoder"].startswith(spec) and row["splits"] == 2
        assert np.isfinite([row["pearson_mean"], row["mse"]]).all()
    assert np.isnan(rows.loc["mean expression (training splits)", "pearson_mean"])  # constant: no r, MSE only
    assert rows.loc["mean expression (training splits)", "mse"] > 0
