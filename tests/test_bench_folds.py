"""`stalign bench --shards`: folds that cannot leak by default, per-fold gene panels chosen on training spots,
baselines on the same folds, inputs checked before any feature is extracted."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.data.dataset import ShardDataset
from stalign.tasks import bench
from stalign.tasks.bench_folds import bench_folds, make_folds, read_patients
from stalign.tasks.hest import hest_gene_panel


@pytest.fixture(scope="module")
def one_slide(small_shards):
    return small_shards("synthetic")  # one 300-spot synthetic slide


def _no_extraction(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("features extracted before the inputs were checked")

    monkeypatch.setattr(bench, "encoder_features", refuse)


def test_one_slide_runs_on_spatial_blocks_with_all_baselines(one_slide, tmp_path, capsys):
    import pandas as pd

    from stalign.cli import main

    out = tmp_path / "b.csv"
    assert main(["bench", "--shards", str(one_slide), "--encoders", "random:timm:test_vit", "--genes", "10",
                 "--latent-dim", "16", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "spatial blocks" in printed and "row to beat" in printed and "LEAKY" not in printed
    table = pd.read_csv(out)
    assert table["encoder"].tolist() == ["mean expression (training folds)", "neighbour average (6 nearest, no image)",
                                         "colour stats + ridge", "random:timm:test_vit"]
    assert table["kind"].tolist() == ["baseline"] * 3 + ["encoder"] and table["to_beat"].sum() == 1
    assert (table["folds"] == "block").all() and not table["leaky"].any() and (table["n_folds"] == 5).all()
    assert np.isfinite(table[["mse", "mae"]].to_numpy()).all()
    assert np.isfinite(table.loc[1:, "pearson_mean"]).all() and np.isnan(table.loc[0, "pearson_mean"])
    best = table.loc[table["kind"] == "baseline", "mse"].idxmin()
    assert table.loc[best, "to_beat"]


def test_block_folds_keep_a_niche_wide_margin(one_slide):
    ds = ShardDataset(one_slide)
    splits, scheme, label = make_folds(ds, seed=3)
    assert scheme == "block" and "margin" in label and len(splits) == 5
    tested = np.concatenate([test for _, test in splits])
    assert np.array_equal(np.sort(tested), np.arange(len(ds)))  # a partition: every spot tested exactly once
    xy = ds.slide_spots(0)["coords_um"]
    niche = float(ds.manifest["niche_um"])
    for train, test in splits:
        assert len(test) and len(train) and not np.intersect1d(train, test).size
        gap = np.abs(xy[train][:, None] - xy[test][None]).max(-1).min()  # Chebyshev, as the crops are squares
        assert gap >= niche


def test_random_spot_folds_are_labelled_leaky_and_panels_come_from_training_spots(one_slide):
    ds = ShardDataset(one_slide)
    expr = ds.expression_matrix().astype(np.float64)
    folds = bench_folds(ds, expr, by="spot", n_splits=3, k_genes=8, log1p=False)  # one slide: a gene filter per
    assert folds.leaky and "LEAKY" in folds.label  # training fold works (was: every spot its own group)
    for (train, _), panel in zip(folds.splits, folds.panels):
        assert panel == hest_gene_panel(expr[train], ds.genes, groups=np.zeros(len(train)), k=8, log1p=False)
    table = bench.bench_shards(one_slide, [], by="spot", n_splits=3, k_genes=8, latent_dim=8, progress=False,
                               features={"noise": np.random.default_rng(0).normal(size=(len(ds), 4))})
    printed = bench.format_table(table).splitlines()
    assert table["leaky"].all() and all("spot LEAKY" in line for line in printed[1:-1])


def test_ridge_has_an_intercept(one_slide):
    """Constant features: a ridge with an intercept predicts the training mean (HEST's, without one, predicts 0)."""
    n = len(ShardDataset(one_slide))
    table = bench.bench_shards(one_slide, [], k_genes=8, latent_dim=8, progress=False,
                               features={"constant": np.ones((n, 3))}).set_index("encoder")
    assert table.loc["constant", "mse"] == pytest.approx(table.loc["mean expression (training folds)", "mse"],
                                                         rel=1e-6)


def test_inputs_are_checked_before_any_feature_is_extracted(one_slide, small_shards, tmp_path, monkeypatch):
    _no_extraction(monkeypatch)
    with pytest.raises(ValueError, match="one slide only, and the 49 spots lie in 2 blocks of .* fewer than the 5 folds"):
        bench.bench_shards(small_shards("squidpy"), ["efficientnet-lite0"], progress=False)
    with pytest.raises(FileNotFoundError, match="nockpt: no such checkpoint"):
        bench.bench_shards(one_slide, [f"model:{tmp_path / 'nockpt'}"], progress=False)
    with pytest.raises(ValueError, match="fold 0 .*no gene is detected"):
        ds = ShardDataset(one_slide)
        bench_folds(ds, np.zeros((len(ds), len(ds.genes))), k_genes=5)


class _ThreeSlides:
    """The part of a ShardDataset that folds across slides read: 3 slides of 2 spots."""

    slide_ids = ["s1", "s2", "s3"]
    manifest = {"niche_um": 100.0}

    def __len__(self) -> int:
        return 6

    def slide_of(self, i: int) -> int:
        return i // 2


def test_folds_by_patient(tmp_path):
    ds = _ThreeSlides()
    (tmp_path / "p.csv").write_text("slide_id,patient\ns1,P1\ns2,P1\ns3,P2\n")
    patients = read_patients(tmp_path / "p.csv")
    splits, scheme, label = make_folds(ds, patients=patients)  # auto: by patient when given
    assert scheme == "patient" and "2 patients" in label
    assert sorted(tuple(te.tolist()) for _, te in splits) == [(0, 1, 2, 3), (4, 5)]
    splits, scheme, _ = make_folds(ds)
    assert scheme == "slide" and len(splits) == 3
    with pytest.raises(ValueError, match=r"lacks slides \['s3'\]"):
        make_folds(ds, patients={"s1": "P1", "s2": "P2"})
