"""stofm.embed / embed_niches on the real Visium crop and synthetic slides: invariance, batching, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

import stofm
from stofm.subslice import CoordinateError


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad

    return ad.read_h5ad(squidpy_crop / "test_data.h5ad")


@pytest.fixture(scope="module")
def tiny(crop):
    import torch

    torch.manual_seed(0)
    return stofm.create_model("stofm-tiny", genes=list(crop.var_names))


def _rotated(adata, angle: float, shift: tuple[float, float]):
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    out = adata.copy()
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64) @ rot.T + np.array(shift)
    return out


def test_embed_whole_slide_is_rigid_motion_invariant(crop, tiny):
    a = stofm.embed(crop.copy(), tiny, progress=False)
    x = a.obsm["X_stofm"]
    assert x.shape == (49, tiny.dim) and np.isfinite(x).all()
    assert a.uns["stofm"]["input_kind"] == "log1p" and a.uns["stofm"]["genes_matched"] == 1999
    for angle, shift in [(0.9, (1e3, -250.0)), (math.pi / 2, (0.0, 0.0))]:
        b = stofm.embed(_rotated(crop, angle, shift), tiny, progress=False)
        assert np.abs(b.obsm["X_stofm"] - x).max() < 1e-4
    # the cells see each other: a different layout changes the embeddings
    c = crop.copy()
    c.obsm["spatial"] = np.asarray(crop.obsm["spatial"])[np.random.default_rng(0).permutation(49)]
    assert np.abs(stofm.embed(c, tiny, progress=False).obsm["X_stofm"] - x).max() > 1e-3


def test_embed_permutes_with_cells_and_batches_alike(crop, tiny):
    kw = dict(n_virtual=0, cells_per_tile=10, max_cells=14, progress=False)
    ref = stofm.embed(crop.copy(), tiny, batch_size=8, **kw)
    assert ref.uns["stofm"]["n_tiles"] >= 4
    one = stofm.embed(crop.copy(), tiny, batch_size=1, **kw)  # no padding at all
    assert np.abs(one.obsm["X_stofm"] - ref.obsm["X_stofm"]).max() < 1e-4
    perm = np.random.default_rng(1).permutation(49)
    p = stofm.embed(crop[perm].copy(), tiny, batch_size=8, **kw)
    assert np.abs(p.obsm["X_stofm"] - ref.obsm["X_stofm"][perm]).max() < 1e-4


def test_embed_large_synthetic_slide_in_tiles(tiny):
    import anndata as ad

    rng = np.random.default_rng(0)
    n, genes = 3000, tiny.genes[:200]
    X = rng.poisson(0.5, size=(n, len(genes))).astype(np.float32)
    a = ad.AnnData(X=X, obsm={"spatial": rng.uniform(0, 20000, size=(n, 2))})
    a.var_names = genes
    with pytest.warns(UserWarning, match="absent"):  # 1,799 of the model's genes are missing
        stofm.embed(a, tiny, cells_per_tile=400, batch_size=3, progress=False, key_cells="X_cell")
    assert a.uns["stofm"]["input_kind"] == "counts" and a.uns["stofm"]["n_tiles"] >= 6
    assert a.obsm["X_stofm"].shape == (n, tiny.dim) and np.isfinite(a.obsm["X_stofm"]).all()
    assert np.allclose(np.linalg.norm(a.obsm["X_cell"], axis=1), 1, atol=1e-4)
    assert np.unique(a.obsm["X_stofm"].round(5), axis=0).shape[0] == n


def test_bad_input(crop, tiny):
    a = crop.copy()
    del a.obsm["spatial"]
    with pytest.raises(CoordinateError, match=r"no obsm\['spatial'\]"):
        stofm.embed(a, tiny, progress=False)
    b = crop.copy()
    b.obsm["spatial"] = np.asarray(b.obsm["spatial"], dtype=float)
    b.obsm["spatial"][4, 0] = np.nan
    with pytest.raises(CoordinateError, match="NaN"):
        stofm.embed(b, tiny, progress=False)
    c = crop.copy()
    c.var_names = [f"other{i}" for i in range(c.n_vars)]
    with pytest.raises(ValueError, match="none of the model's 1999 genes"):
        stofm.embed(c, tiny, progress=False)
    for kw, what in (({"layer": "raw"}, r"no layer 'raw'"), ({"gene_key": "symbol"}, r"no var column 'symbol'")):
        with pytest.raises(ValueError, match=what):  # one error naming it, not a KeyError
            stofm.embed(crop.copy(), tiny, progress=False, **kw)


def test_fewer_cells_than_k(crop, tiny):
    few = crop[:5].copy()
    stofm.embed(few, tiny, progress=False)  # k=16 > 4 other cells: all cells are neighbours
    assert few.obsm["X_stofm"].shape == (5, tiny.dim) and np.isfinite(few.obsm["X_stofm"]).all()
    one = crop[:1].copy()
    stofm.embed(one, tiny, progress=False)
    assert np.isfinite(one.obsm["X_stofm"]).all()


def test_embed_niches_are_local(crop, tiny):
    from stofm.util.knn import neighbor_indices

    a = stofm.embed_niches(crop.copy(), tiny, n_neighbors=7, n_virtual=0, progress=False)
    assert a.obsm["X_stofm_niche"].shape == (49, tiny.dim) and np.isfinite(a.obsm["X_stofm_niche"]).all()
    nb = neighbor_indices(np.asarray(crop.obsm["spatial"], dtype=float), 7)
    assert nb.shape == (49, 7) and (nb[:, 0] == np.arange(49)).all()
    z = stofm.embed_niches(crop.copy(), tiny, neighbors=nb, n_virtual=0, progress=False).obsm["X_stofm_niche"]
    far = [i for i in range(49) if 0 not in nb[i]]
    b = crop.copy()
    b.X = b.X.toarray()
    b.X[0] = b.X[0][::-1]  # change cell 0's expression only
    z2 = stofm.embed_niches(b, tiny, neighbors=nb, n_virtual=0, progress=False).obsm["X_stofm_niche"]
    assert np.abs(z2[far] - z[far]).max() < 1e-5
    assert np.abs(z2[0] - z[0]).max() > 1e-4


def test_bert_cell_encoder_model_roundtrip(crop, tmp_path):
    import torch

    torch.manual_seed(0)
    model = stofm.create_model("stofm-tiny", genes=list(crop.var_names),
                               cell_encoder_cfg={"kind": "bert", "width": 32, "depth": 1, "heads": 2, "max_len": 64,
                                                 "out_dim": 32})
    assert model.cell_encoder.kind == "bert"
    ref = stofm.embed(crop.copy(), model, progress=False).obsm["X_stofm"]
    model.save_pretrained(tmp_path / "m")
    loaded = stofm.create_model(tmp_path / "m")
    out = stofm.embed(crop.copy(), loaded, progress=False).obsm["X_stofm"]
    assert np.abs(out - ref).max() < 1e-5
    with pytest.raises(ValueError, match="unknown stofm model"):
        stofm.create_model("stofm-huge", genes=["a"])
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "m" / "model.safetensors").unlink()
        stofm.create_model(tmp_path / "m")


def test_bf16_path_runs_close_to_fp32(crop, tiny):
    ref = stofm.embed(crop.copy(), tiny, progress=False).obsm["X_stofm"]
    low = stofm.embed(crop.copy(), tiny, dtype="bf16", progress=False).obsm["X_stofm"]
    assert np.isfinite(low).all()
    cos = (ref * low).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(low, axis=1)
    assert cos.min() > 0.95


def test_embed_benchmark_runs_and_records_both_clusterings(tmp_path, subprocess_env):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("igraph")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "stofm_embed.py"
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(script), "--cells", "1000", "2500", "--genes", "40", "--cells-per-tile", "500",
                           "--cluster-method", "kmeans", "leiden", "--threads", "1", "--results", str(results), "--original",
                           "--original-layers", "2"],
                          cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "- command: `python benchmarks/stofm_embed.py" in text and "device: CPU" in text
    assert "| stofm-tiny | sdpa | fp32 | kmeans | 2,500 |" in text and "| fp32 | leiden | 2,500 |" in text
    assert "| original SToFM (2x256, 32 heads) | manual | fp32 | leiden | 2,500 |" in text
    # the sweep: each configuration's time per cell against its smallest slide's (1.00 on that slide itself)
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| stofm-tiny | sdpa | fp32 | kmeans |")]
    assert [r[5].strip() for r in rows] == ["1,000", "2,500"] and rows[0][-2].strip() == "1.00"
    assert 0 < float(rows[1][-2]) < 10


@pytest.mark.gpu
def test_cuda_embed_matches_cpu_and_bf16_stays_close(crop, tiny):
    import copy

    ref = stofm.embed(crop.copy(), tiny, progress=False).obsm["X_stofm"]
    on_gpu = copy.deepcopy(tiny)  # embed(device=...) moves the model; the fixture stays on the CPU
    gpu = stofm.embed(crop.copy(), on_gpu, device="cuda", progress=False).obsm["X_stofm"]
    assert np.abs(gpu - ref).max() < 1e-3
    for cm in ("kmeans", "leiden"):  # virtual cells clustered on the GPU tensors
        assert np.isfinite(stofm.embed(crop.copy(), on_gpu, cluster_method=cm, progress=False).obsm["X_stofm"]).all()
    low = stofm.embed(crop.copy(), on_gpu, dtype="bf16", progress=False).obsm["X_stofm"]
    cos = (ref * low).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(low, axis=1)
    assert cos.min() > 0.95


def test_tiled_embeddings_what_is_and_is_not_rotation_invariant(crop, tiny):
    """Several tiles (docs/stofm.md): a translation changes nothing; under a rotation every cell whose sub-slice
    holds the same cells gets the same embedding, and a cell whose axis-aligned tile changed may differ."""
    from stofm.subslice import tile_slide

    kw = dict(n_virtual=0, cells_per_tile=10, max_cells=14, progress=False)
    ref = stofm.embed(crop.copy(), tiny, **kw)
    assert ref.uns["stofm"]["n_tiles"] >= 4
    moved = stofm.embed(_rotated(crop, 0.0, (5e3, -7e2)), tiny, **kw)
    assert np.abs(moved.obsm["X_stofm"] - ref.obsm["X_stofm"]).max() < 1e-4

    def tile_of(adata):
        tiles = tile_slide(np.asarray(adata.obsm["spatial"], np.float64), cells_per_tile=10, max_cells=14)
        return {int(i): frozenset(t.tolist()) for t in tiles for i in t}

    rot = _rotated(crop, math.pi / 2, (0.0, 0.0))  # 13 of the 49 cells keep their tile here
    turned = stofm.embed(rot, tiny, **kw)
    before, after = tile_of(crop), tile_of(rot)
    same = np.asarray([before[i] == after[i] for i in range(crop.n_obs)])
    diff = np.abs(turned.obsm["X_stofm"] - ref.obsm["X_stofm"]).max(1)
    assert same.any() and (~same).any()  # some tiles survive the rotation, some do not
    assert diff[same].max() < 1e-4
    assert diff[~same].max() > 1e-3


def test_embedding_with_a_config_name_warns_that_weights_are_random(squidpy_crop, tmp_path):
    from stofm.cli import main

    with pytest.warns(UserWarning, match="weights are random"):
        assert main(["embed", str(squidpy_crop / "test_data.h5ad"), "--model", "stofm-tiny", "--out",
                     str(tmp_path / "e.h5ad")]) == 0
