"""HEST-Benchmark on HEST-Bench's own layout (a task folder built here from the real Visium crop and its mirror):
the layout is read, the protocol reproduces an independent computation of HEST's recipe, variants are labelled."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stalign.data.hest_bench_io import write_patches
from stalign.tasks.hest_bench import hest_bench, patch_features, read_task

GENES = 12


@pytest.fixture(scope="module")
def task(tmp_path_factory, squidpy_crop):
    root = tmp_path_factory.mktemp("bench_data") / "MOUSEBRAIN"
    a = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    xy = np.asarray(a.obsm["spatial"], float)
    genes = list(a.var_names[np.argsort(-np.asarray(a.X.var(0) if not hasattr(a.X, "toarray") else
                                                     a.X.toarray().var(0)))[:GENES]])
    for sid, image, coords in (("S1", img, xy), ("S2", img[:, ::-1], xy * [-1, 1] + [img.shape[1] - 1, 0])):
        half = 24
        patches = np.stack([np.pad(image, ((half, half), (half, half), (0, 0)))[int(y):int(y) + 2 * half,
                                                                                 int(x):int(x) + 2 * half]
                            for x, y in coords])
        write_patches(root / "patches" / f"{sid}.h5", patches, list(a.obs_names), coords)
        (root / "adata").mkdir(parents=True, exist_ok=True)
        raw = a.copy()
        raw.X = np.expm1(np.asarray(a.X.toarray() if hasattr(a.X, "toarray") else a.X)) * (2 if sid == "S2" else 1)
        raw.write_h5ad(root / "adata" / f"{sid}.h5ad")
    (root / "var_50genes.json").write_text(json.dumps({"genes": genes}))
    (root / "splits").mkdir()
    for i, (train, test) in enumerate((("S1", "S2"), ("S2", "S1"))):
        for kind, sid in (("train", train), ("test", test)):
            pd.DataFrame({"sample_id": [sid], "patches_path": [f"patches/{sid}.h5"],
                          "expr_path": [f"adata/{sid}.h5ad"]}).to_csv(root / "splits" / f"{kind}_{i}.csv",
                                                                     index=False)
    return root


def _hest_by_hand(features, task_root, latent_dim):
    """HEST's recipe written out independently: log1p(raw), scaler + PCA(seed 1), lsqr ridge, scipy pearsonr."""
    from scipy.stats import pearsonr
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    genes = json.loads((task_root / "var_50genes.json").read_text())["genes"]
    expr = {s: np.log1p(ad.read_h5ad(task_root / "adata" / f"{s}.h5ad")[:, genes].X.astype(np.float64))
            for s in ("S1", "S2")}
    means = []
    for train, test in (("S1", "S2"), ("S2", "S1")):
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=latent_dim, random_state=1))])
        xt = np.float32(pipe.fit_transform(features[train]))  # as HEST: fit_transform on train, transform on test
        xs = np.float32(pipe.transform(features[test]))
        reg = Ridge(solver="lsqr", alpha=100 / (latent_dim * len(genes)), random_state=1, fit_intercept=False,
                    max_iter=1000).fit(xt, expr[train])
        pred = reg.predict(xs)
        means.append(np.mean([pearsonr(expr[test][:, j], pred[:, j])[0] for j in range(len(genes))]))
    return float(np.mean(means)), float(np.std(means))


def test_hest_bench_reproduces_the_protocol(task, tmp_path):
    import torch

    from stalign.cli import main
    from stalign.models.image_encoders import create_image_encoder

    t = read_task(task)
    assert t["name"] == "MOUSEBRAIN" and len(t["genes"]) == GENES and len(t["splits"]) == 2
    table = hest_bench(task, ["efficientnet-lite0"], latent_dim=16, progress=False)
    net = create_image_encoder("efficientnet-lite0", pretrained=True).eval()
    with torch.no_grad():
        feats = {s: patch_features(net, task / "patches" / f"{s}.h5", progress=False) for s in ("S1", "S2")}
    mean, std = _hest_by_hand(feats, task, 16)
    row = table.iloc[0]
    assert row["variant"] == "HEST protocol" and row["splits"] == 2
    assert row["pearson_mean"] == pytest.approx(mean, abs=1e-6) and row["pearson_std"] == pytest.approx(std, abs=1e-6)
    out = tmp_path / "hest.csv"
    assert main(["bench", "--hest-bench", str(task), "--encoders", "efficientnet-lite0", "--latent-dim", "16",
                 "--no-pca", "--per-slide", "--out", str(out), "--quiet"]) == 0
    written = pd.read_csv(out)
    assert written.loc[written["kind"] == "encoder", "variant"].tolist() == ["no PCA, per-slide Pearson"]


def test_hest_bench_errors(task, tmp_path, capsys):
    from stalign.cli import main

    assert main(["bench", "--hest-bench", str(tmp_path), "--encoders", "efficientnet-lite0"]) == 1
    assert "not a HEST-Bench task folder" in capsys.readouterr().err
    assert main(["bench", "--hest-bench", str(task), "--encoders", "efficientnet-lite0", "--quiet"]) == 1
    assert "PCA-256 needs at least 256 training spots" in capsys.readouterr().err  # 49 spots per sample here
    assert main(["bench", "--encoders", "efficientnet-lite0"]) == 1
    assert "either --shards" in capsys.readouterr().err


def test_own_shards_export_to_a_hest_bench_task(tmp_path, squidpy_crop, capsys):
    """`stalign data export-hest` turns two prepared slides into a task folder that --hest-bench runs; the
    targets it reads back are the shards' own expression."""
    from stalign.cli import main
    from stalign.data.shards import read_manifest, read_shard

    mirror = tmp_path / "mirror"
    mirror.mkdir()
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(mirror / "m.png")
    a = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    a.obsm["spatial"] = a.obsm["spatial"] * [-1, 1] + [img.shape[1], 0]
    a.write_h5ad(mirror / "m.h5ad")
    shards = tmp_path / "shards"
    assert main(["prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
                 "--h5ad", str(mirror / "m.h5ad"), "--image", str(mirror / "m.png"), "--um-per-px", "0.6149",
                 "--out", str(shards), "--n-top-genes", "8", "--patch-px", "32", "--quiet"]) == 0
    task = tmp_path / "task"
    assert main(["data", "export-hest", str(shards), "--out", str(task)]) == 0
    t = read_task(task)
    assert len(t["splits"]) == 2 and t["genes"] == read_manifest(shards)["genes"]
    from stalign.tasks.hest_bench import sample_expression

    shard = read_shard(next((shards / "shards").glob("*.h5")))
    sid = next((shards / "shards").glob("*.h5")).stem
    back = sample_expression(task / "adata" / f"{sid}.h5ad", t["genes"], list(shard["barcodes"]))
    np.testing.assert_allclose(back, shard["expr"], atol=1e-6)
    table = hest_bench(task, ["efficientnet-lite0"], latent_dim=8, progress=False)
    assert table.iloc[0]["splits"] == 2 and np.isfinite(table.iloc[0]["pearson_mean"])
    assert main(["data", "export-hest", str(shards), "--out", str(task)]) == 1  # never overwrites
    assert "not empty" in capsys.readouterr().err
