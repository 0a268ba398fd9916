"""`stalign bench --shards`: folds that cannot leak by default, per-fold gene panels chosen on training spots,
baselines on the same folds, inputs checked before any feature is extracted."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.data.dataset import ShardDataset
from stalign.tasks import bench
from stalign.tasks.bench_folds import bench_folds, make_folds, read_slide_groups
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
    with pytest.raises(ValueError, match=r"no site for slides \['.+'\] \(a site column of prep --samples"):
        bench.bench_shards(one_slide, ["efficientnet-lite0"], by="site", progress=False)
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

    def slide_numbers(self) -> np.ndarray:
        return np.arange(len(self)) // 2


def test_folds_by_patient(tmp_path):
    ds = _ThreeSlides()
    (tmp_path / "p.csv").write_text("slide_id,patient\ns1,P1\ns2,P1\ns3,P2\n")
    patients = read_slide_groups(tmp_path / "p.csv", "patient")
    splits, scheme, label = make_folds(ds, patients=patients)  # auto: by patient when given
    assert scheme == "patient" and "2 patients" in label
    assert sorted(tuple(te.tolist()) for _, te in splits) == [(0, 1, 2, 3), (4, 5)]
    splits, scheme, _ = make_folds(ds)
    assert scheme == "slide" and len(splits) == 3
    with pytest.raises(ValueError, match=r"no patient for slides \['s3'\] \(a patient column of prep --samples"):
        make_folds(ds, patients={"s1": "P1", "s2": "P2"})


class _FourSlides(_ThreeSlides):
    """4 slides of 2 spots; s1, s2 of site A, s3 of B, s4 of C (manifest entries), no patient."""

    slide_ids = ["s1", "s2", "s3", "s4"]
    manifest = {"niche_um": 100.0, "slides": [{"slide_id": s, "site": site} for s, site in
                                              zip(slide_ids, ["A", "A", "B", "C"])]}

    def __len__(self) -> int:
        return 8


def test_folds_by_site_hold_out_each_unseen_site(tmp_path):
    ds = _FourSlides()
    splits, scheme, label = make_folds(ds)  # auto: by site when the shards know 2+ sites
    assert scheme == "site" and label == "leave-one-site-out (3 sites)"
    assert [te.tolist() for _, te in splits] == [[0, 1, 2, 3], [4, 5], [6, 7]]  # one fold per held-out site
    assert [tr.tolist() for tr, _ in splits][0] == [4, 5, 6, 7]
    (tmp_path / "s.tsv").write_text("slide_id\tsite\ns3\tA\ns4\tA\n")  # a table wins over the manifest
    for by in ("site", "auto"):  # a table given is used as such
        with pytest.raises(ValueError, match=r"one site only \(A\); folds by site need two or more"):
            make_folds(ds, by=by, sites=read_slide_groups(tmp_path / "s.tsv", "site"))
    ds.manifest = {"slides": ds.manifest["slides"][:1] + [{"slide_id": "s3", "site": "A"}]}
    assert make_folds(ds)[1] == "slide"  # one site: auto falls back to slides
    ds.manifest = {"slides": _FourSlides.manifest["slides"][:3]}
    with pytest.raises(ValueError, match=r"no site for slides \['s4'\] .*--sites FILE"):
        make_folds(ds, by="site")
    assert make_folds(ds)[1] == "slide"  # auto needs a site for every slide
    (tmp_path / "bad.csv").write_text("slide_id,patient\ns1,P\n")
    with pytest.raises(ValueError, match=r"bad.csv: needs columns slide_id and site"):
        read_slide_groups(tmp_path / "bad.csv", "site")


def test_site_comes_from_the_samples_table_or_a_constant_obs_column():
    import anndata as ad
    import pandas as pd

    from stalign.data.sample import SlideSample, slide_groups

    obs = pd.DataFrame({"site": ["site1"] * 3, "patient": ["P1", "P2", "P1"]}, index=["a", "b", "c"])
    sample = SlideSample(slide_id="x", image_path="x.png", adata=ad.AnnData(np.ones((3, 2)), obs=obs),
                         coords_px=np.zeros((3, 2)), um_per_px=1.0, pixel_size_source="user flag")
    assert slide_groups(sample) == {"site": "site1"}  # several patients in one slide: no slide-level patient
    sample.groups.update(site="given", patient="P9")
    assert slide_groups(sample) == {"patient": "P9", "site": "given"}


def test_bench_by_site_on_shards(one_slide, tmp_path):
    """Shards of three slides of two sites: one fold per held-out site, no neighbour baseline (no training spot
    shares the test slide)."""
    import json
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(one_slide, root, ignore=shutil.ignore_patterns("features"))
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["slides"][0]
    manifest["slides"] = []
    for i, site in enumerate(["s0", "s0", "s1"]):
        sid = f"slide{i}"
        shutil.copy(root / entry["shard"], root / "shards" / f"{sid}.h5")
        manifest["slides"].append({**entry, "slide_id": sid, "shard": f"shards/{sid}.h5", "site": site})
    (root / "manifest.json").write_text(json.dumps(manifest))
    n = 3 * entry["n_spots"]
    table = bench.bench_shards(root, [], k_genes=8, latent_dim=8, progress=False,
                               features={"noise": np.random.default_rng(0).normal(size=(n, 4))})
    assert table.attrs["by"] == "site" and table.attrs["folds"] == "leave-one-site-out (2 sites)"
    assert (table["n_folds"] == 2).all() and (table["folds"] == "site").all()
    assert not table["encoder"].str.startswith("neighbour").any()
