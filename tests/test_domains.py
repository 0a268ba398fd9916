"""Zero-shot domains on the real crop: clustering recovers the annotated regions; scores and plot."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.tasks.domains import cluster_domains, plot_domains, score_domains


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad

    return ad.read_h5ad(squidpy_crop / "test_data.h5ad")


def test_kmeans_domains_match_the_annotation_and_are_plotted(tmp_path, crop):
    emb = crop.obsm["X_pca"][:, :10]
    labels = cluster_domains(emb, n_domains=2, seed=0)
    scores = score_domains(labels, crop.obs["leiden"])
    assert scores["ari"] > 0.6 and scores["nmi"] > 0.5 and scores["n_scored"] == crop.n_obs
    shuffled = score_domains(np.random.default_rng(0).permutation(labels), crop.obs["leiden"])
    assert shuffled["ari"] < 0.2
    auto = cluster_domains(emb)  # number of domains chosen by silhouette
    assert 2 <= len(set(auto)) <= 10
    path = plot_domains(crop.obsm["spatial"], labels, tmp_path / "domains.png", spot_diameter_px=89.44)
    assert path.stat().st_size > 2000


def test_missing_annotations_are_left_out_and_bad_input_is_refused(crop):
    truth = crop.obs["leiden"].astype(object).to_numpy()
    truth[:5] = None
    assert score_domains(np.zeros(crop.n_obs, int), truth)["n_scored"] == crop.n_obs - 5
    with pytest.raises(ValueError, match="annotations"):
        score_domains([0, 1], ["a"])
    with pytest.raises(ValueError, match="n_domains"):
        cluster_domains(crop.obsm["X_pca"], n_domains=100)
    with pytest.raises(ValueError, match="kmeans"):
        cluster_domains(crop.obsm["X_pca"], method="dbscan")


def test_leiden_when_installed(crop):
    pytest.importorskip("igraph")
    labels = cluster_domains(crop.obsm["X_pca"][:, :10], method="leiden", resolution=0.5)
    assert score_domains(labels, crop.obs["leiden"])["ari"] > 0.3
    finer = cluster_domains(crop.obsm["X_pca"][:, :10], method="leiden", resolution=3.0)
    assert len(set(finer)) > len(set(labels))  # resolution controls the granularity


def test_leiden_without_the_extra_names_it(crop, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "igraph", None)
    with pytest.raises(ImportError, match=r"stalign\[leiden\]"):
        cluster_domains(crop.obsm["X_pca"][:, :10], method="leiden")
