"""``make demo`` (``stalign demo``): every stage with tiny settings on the real crop and a small synthetic
slide; the tables a user reads (recall next to chance, the held-out Pearson table, heat maps) must be there."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from stalign.commands import demo
from stalign.lab import demo_ablation, demo_stages

TINY = ["--synth-spots", "60", "--synth-um-per-px", "2", "--n-top-genes", "20", "--patch-px", "64",
        "--train-steps", "2", "--split-by", "spot", "--crop-steps", "2", "--crop-folds", "2", "--batch-size", "8", "--heatmap-genes", "2",
        "--ablation-spots", "100", "--ablation-steps", "2", "--quiet"]
METHODS = ("zero-shot retrieval (k=10)", "few-shot ridge on stalign embeddings", "mean expression",
           "neighbour average (6 nearest, no image)", "efficientnet-lite0 features + ridge")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert demo.main(["--out", str(out), *TINY]) == 0
    return out, buf.getvalue(), json.loads((out / "summary.json").read_text())


def test_demo_runs_every_stage_in_order(run):
    _, text, summary = run
    assert list(summary["stages"]) == ["fetch", "prep", "train", "evaluate", "predict", "ablation"]
    positions = [text.index(f"=== stage {name}") for name in summary["stages"]]
    assert positions == sorted(positions)
    assert text.index("=== results") > positions[-1]


def test_prep_table(run):
    out, text, summary = run
    for header in ("[prep]", "squidpy_visium_crop", "synth0", "the spot pitch would give 0.72"):
        assert header in text
    rows = {r["data"]: r for r in summary["tables"]["prep"]}
    real, synth = rows["squidpy"], rows["synthetic"]
    assert real["spots"] == 49 and real["kept"] + real["dropped"] == 49 and real["genes"] == 20
    assert real["um_per_px"] == pytest.approx(65 / 89.44, rel=1e-3) and "spot diameter" in real["pixel size from"]
    assert synth["spots"] == 60 and synth["dropped"] > 0 and synth["um_per_px"] == pytest.approx(2.0)
    assert "array grid" in synth["pixel size from"]  # Visium numbering of the synthetic grid: the grid fit comes first
    with h5py.File(out / "shards" / "squidpy" / "shards" / "squidpy_visium_crop.h5") as f:
        assert f["spot_patches"].shape == (real["kept"], 64, 64, 3) and f["expr"].shape == (real["kept"], 20)


def test_train_prints_held_out_recall_next_to_chance(run):
    out, text, summary = run
    rows = summary["tables"][demo_stages.TRAIN_TABLE]
    assert [r["retrieval"] for r in rows] == ["image -> gene", "gene -> image"]
    n = rows[0]["held-out spots"]
    assert "held-out spots are random spots of the slide" in text  # the note names the split the run used
    assert n > 0 and rows[0]["steps"] == 2
    for r in rows:
        for k in (1, 5, 10):
            assert 0.0 <= float(r[f"R@{k}"]) <= 1.0
            assert float(r[f"chance@{k}"]) == pytest.approx(min(k, n) / n, abs=1e-3)
    assert f"[{demo_stages.TRAIN_TABLE}]" in text and "chance@10" in text and "held-out retrieval after 2 steps" in text
    assert (out / "train" / "final" / "model.safetensors").is_file()


def test_evaluate_table_has_all_five_methods_on_the_real_crop(run):
    import pandas as pd
    import yaml

    out, text, summary = run
    rows = {r["method"]: r for r in summary["tables"][demo_stages.CROP_TABLE]}
    assert tuple(rows) == METHODS
    for name, r in rows.items():
        assert r["held-out spots"] == 49
        assert np.isfinite(float(r["MSE"])) and float(r["MSE"]) > 0
        pearson = r["pearson r (mean ± std over genes)"]
        if name == "mean expression":  # a constant prediction per fold has no correlation
            assert pearson == "undefined (constant)"
        else:
            mean, std = (float(v) for v in pearson.split(" ± "))
            assert -1 <= mean <= 1 and std >= 0
    folds = pd.read_csv(out / "crop" / "heldout_folds.csv")
    assert len(folds) == 2 * len(METHODS) and folds.groupby("fold")["n_test"].first().sum() == 49
    for note in ("pixel size 0.7267 µm/px from the Visium spot diameter (65 µm", "49 spots are too few",
                 "Learning is shown on the synthetic slide"):
        assert note in text
    # each fold's model saw only its training spots: the held-out spots are a separate slide it never trained on
    for f in range(2):
        cfg = yaml.safe_load((out / "crop" / f"fold{f}" / "train" / "config.yaml").read_text())
        assert cfg["slides"] == [demo_stages.TRAIN_SLIDE] and cfg["val_fraction"] == 0
        manifest = json.loads((out / "crop" / f"fold{f}" / "shards" / "manifest.json").read_text())
        assert sum(s["n_spots"] for s in manifest["slides"]) == 49


def test_predict_writes_heatmaps_predicted_and_measured(run):
    import anndata as ad

    from stalign.data.fetch import fetch

    out, text, summary = run
    rows = summary["tables"][demo_stages.HEATMAP_TABLE]
    assert len(rows) == 2
    for r in rows:
        for key in ("predicted", "measured"):
            png = out / "heatmaps" / key / f"{r['gene']}.png"
            assert str(png) == r[key] and str(png) in text
            assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred = ad.read_h5ad(out / "heatmaps" / "heldout_zero_shot.h5ad")
    assert pred.shape == (49, 20) and set(pred.obs["fold"]) == {0, 1}
    assert (np.abs(pred.layers["zero_shot"]).sum(axis=1) > 0).all()  # every spot predicted by its fold's model
    real = ad.read_h5ad(fetch(demo_stages.SQUIDPY) / "test_data.h5ad")
    np.testing.assert_allclose(pred.layers["measured"], real[:, list(pred.var_names)].X.toarray(), rtol=1e-6)
    assert pred.uns["stalign"]["pixel_size_source"].startswith("Visium spot diameter")


def test_spatial_folds_are_contiguous_bands():
    xy = np.stack([np.tile(np.arange(5.0), 10), np.repeat(np.arange(10.0) * 3, 5)], 1)  # 5 wide, 10 rows tall
    folds = demo_stages.spatial_folds(xy, 5)
    assert np.bincount(folds).tolist() == [10] * 5
    for f in range(4):  # bands along the longer (y) axis, each holding whole rows
        assert xy[folds == f, 1].max() < xy[folds == f + 1, 1].min()
    with pytest.raises(ValueError, match="at least 2 folds"):
        demo_stages.spatial_folds(xy, 1)
    with pytest.raises(ValueError, match="empty"):
        demo_stages.spatial_folds(np.asarray([[0.0, 0.0], [0.0, 10.0]]), 3)


def test_demo_stage_without_its_inputs_names_the_missing_step(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the prep stage first"):
        demo.main(["--out", str(tmp_path), "--stages", "train", "--quiet"])
    with pytest.raises(FileNotFoundError, match="run the evaluate stage first"):
        demo.main(["--out", str(tmp_path), "--stages", "predict", "--quiet"])


def test_demo_rejects_unknown_stage(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--stages", "fetch,nonsense"])


def test_resumed_shards_with_another_pixel_size_are_refused(run):
    out, _, _ = run
    with pytest.raises(ValueError, match="cut at 0.7267 µm/px, this run asks 0.7246"):
        demo.main(["--out", str(out), "--stages", "prep", "--pixel-size-from", "pitch", *TINY])


def test_demo_configs_are_found_from_another_folder(tmp_path, monkeypatch):
    """`stalign demo` run outside the checkout still finds configs/demo.yaml of the source tree (the stages pass
    --config to train_from_config, whose loader looks up shipped configs by name)."""
    from stalign.training.config import find_config

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    assert find_config("configs/demo.yaml").resolve() == (repo / "configs" / "demo.yaml").resolve()
    with pytest.raises(FileNotFoundError, match="mine.yaml does not exist"):  # not in the checkout: one line
        find_config("mine.yaml")


def test_short_ablation_table(run):
    """One seed of the spot-only, + niche and three-target arms next to the baselines, with the pointer to the full
    table."""
    out, text, summary = run
    rows = {r["method"]: r for r in summary["tables"][demo_ablation.ABLATION_TABLE]}
    assert {"spot image only (spot loss)", "+ niche image (spot + niche losses)", "three targets, project variant"
            } <= set(rows)
    assert any(m.startswith("neighbour average") for m in rows) and any(m.startswith("ImageNet") for m in rows), list(rows)
    for r in rows.values():
        for key in ("r spot genes", "r context genes"):
            assert -1.0 <= float(r[key]) <= 1.0
    assert "benchmarks/RESULTS.md" in text and (out / "ablation" / "ablation_rows.csv").is_file()
