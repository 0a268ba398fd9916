"""stofm.leiden: exact kNN graph, seeded Leiden, resolution bisection; the clusters follow known groups."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from stofm.leiden import knn, knn_graph, leiden, leiden_n_clusters

pytest.importorskip("igraph")


def _blobs(n_per: int = 200, n_groups: int = 4, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 6, size=(n_groups, dim))
    truth = np.repeat(np.arange(n_groups), n_per)
    return (centres[truth] + rng.normal(size=(len(truth), dim))).astype(np.float32), truth


def test_knn_is_exact_and_excludes_self():
    from sklearn.neighbors import NearestNeighbors

    x, _ = _blobs(60, 3)
    idx, dist = knn(x, 5, chunk=17)  # several chunks
    ref_d, ref_i = NearestNeighbors(n_neighbors=6).fit(x).kneighbors(x)
    assert not (idx == np.arange(len(x))[:, None]).any()
    np.testing.assert_allclose(dist, ref_d[:, 1:], rtol=1e-4, atol=1e-4)
    assert (np.sort(idx, 1) == np.sort(ref_i[:, 1:], 1)).mean() > 0.99  # ties aside, the same neighbours
    assert knn(x[:3], 10)[0].shape == (3, 2)  # k capped at N - 1
    with pytest.raises(ValueError, match="at least 2"):
        knn(x[:1], 5)


def test_graph_is_undirected_weighted_and_covers_every_point():
    x, _ = _blobs(50, 2)
    g = knn_graph(x, 6)
    assert g.vcount() == len(x) and not g.is_directed()
    assert min(g.degree()) >= 6 and g.ecount() >= len(x) * 6 // 2
    w = np.asarray(g.es["weight"])
    assert ((w > 0) & (w <= 1)).all()


def test_leiden_recovers_groups_is_seeded_and_resolution_matters():
    from sklearn.metrics import adjusted_rand_score

    x, truth = _blobs()
    labels = leiden(x, resolution=0.3, seed=1)
    assert adjusted_rand_score(truth, labels) > 0.95
    assert np.array_equal(labels, leiden(x, resolution=0.3, seed=1))
    assert len(np.unique(leiden(x, resolution=5.0))) > len(np.unique(labels))
    picked = leiden_n_clusters(x, 4, seed=0)
    assert len(np.unique(picked)) == 4 and adjusted_rand_score(truth, picked) > 0.95
    assert abs(len(np.unique(leiden_n_clusters(x, 12))) - 12) <= 1
    with pytest.raises(ValueError, match="resolution"):
        leiden(x, resolution=0)


def test_torch_input_and_more_points_than_one_chunk():
    import torch

    x, truth = _blobs(1500, 4, dim=16)  # 6,000 points, 3 chunks of the distance matrix
    labels = leiden_n_clusters(torch.as_tensor(x), 4)
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(truth, labels) > 0.95


def test_missing_igraph_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "igraph", None)
    with pytest.raises(ImportError, match=r"stalign\[leiden\]"):
        leiden(_blobs(20, 2)[0])
