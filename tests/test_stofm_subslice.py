"""Sub-slices (square tiling, recursive splits) and virtual cells (torch k-means on 0.2·xy + 0.8·PCA)."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from stofm.subslice import (
    CoordinateError,
    scale_to_diameter,
    tile_slide,
)
from stofm.util.geometry import slide_diameter
from stofm.virtual_cells import virtual_cells


def _partition_ok(tiles: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(tiles)
    assert len(allidx) == n and np.array_equal(np.sort(allidx), np.arange(n))
    assert all(len(t) > 0 for t in tiles)


def test_tiles_partition_and_size():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 5000, size=(10_000, 2))
    tiles = tile_slide(xy, cells_per_tile=1000)
    _partition_ok(tiles, 10_000)
    sizes = np.array([len(t) for t in tiles])
    assert sizes.max() <= 1500 and 6 <= len(tiles) <= 16
    assert abs(sizes.mean() - 1000) < 400
    # tiles are spatially compact: each tile's box is far smaller than the slide
    for t in tiles:
        assert np.ptp(xy[t], axis=0).max() < 2600


def test_dense_clump_is_split_recursively():
    rng = np.random.default_rng(1)
    sparse = rng.uniform(0, 1000, size=(500, 2))
    clump = rng.normal(500, 3, size=(3000, 2))
    pile = np.full((400, 2), 10.0)  # many cells at one position
    xy = np.concatenate([sparse, clump, pile])
    tiles = tile_slide(xy, cells_per_tile=200, max_cells=250)
    _partition_ok(tiles, len(xy))
    assert max(len(t) for t in tiles) <= 250


def test_diameter_scaling_is_rotation_invariant():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 300, size=(500, 2))
    a = 0.6
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    assert slide_diameter(xy) == pytest.approx(slide_diameter(xy @ rot.T + 40))
    scaled, factor = scale_to_diameter(xy)
    d = np.sqrt(((scaled[:, None] - scaled[None]) ** 2).sum(-1)).max()
    assert d == pytest.approx(100.0) and factor == pytest.approx(100.0 / slide_diameter(xy))
    line = np.stack([np.arange(50.0), 2 * np.arange(50.0)], 1)  # collinear cells: no convex hull
    assert slide_diameter(line) == pytest.approx(math.hypot(49, 98))
    _partition_ok(tile_slide(line, cells_per_tile=10), 50)


def test_bad_coordinates():
    with pytest.raises(CoordinateError, match="NaN"):
        tile_slide(np.array([[0.0, 1.0], [np.nan, 2.0]]))
    with pytest.raises(CoordinateError, match="shape"):
        tile_slide(np.zeros((5, 3)))
    assert [t.tolist() for t in tile_slide(np.array([[3.0, 3.0]]))] == [[0]]


def _two_domain_slide(seed: int = 0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 100, size=(600, 2))
    left = xy[:, 0] < 50
    emb = rng.normal(0, 0.1, size=(600, 16)) + np.where(left[:, None], 1.0, -1.0) * np.eye(16)[0]
    return xy, emb.astype(np.float32), left


def test_virtual_cells_means_and_determinism():
    xy, emb, left = _two_domain_slide()
    cxy, cemb, labels = virtual_cells(xy, emb, 8, seed=0)
    assert cxy.shape == (8, 2) and cemb.shape == (8, 16) and labels.shape == (600,)
    for c in range(8):
        assert np.allclose(cxy[c], xy[labels == c].mean(0)) and np.allclose(cemb[c], emb[labels == c].mean(0), atol=1e-5)
    # clusters respect the expression domains (0.8 weight on the embedding)
    purity = np.mean([max(left[labels == c].mean(), 1 - left[labels == c].mean()) for c in range(8)])
    assert purity > 0.95
    again = virtual_cells(xy, emb, 8, seed=0)[2]
    assert np.array_equal(labels, again)


def test_virtual_cells_rotation_equivariant_and_torch():
    import torch

    xy, emb, _ = _two_domain_slide(1)
    a = 1.1
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    cxy, _, labels = virtual_cells(xy, emb, 6, seed=3)
    cxy2, _, labels2 = virtual_cells(xy @ rot.T + 7, emb, 6, seed=3)
    assert np.array_equal(labels, labels2)
    assert np.allclose(cxy @ rot.T + 7, cxy2, atol=1e-6)
    _, te, tl = virtual_cells(torch.as_tensor(xy), torch.as_tensor(emb), 6, seed=3)
    assert isinstance(te, torch.Tensor) and np.array_equal(tl.numpy(), labels)
    # more clusters than cells: one virtual cell per cell
    assert virtual_cells(xy[:4], emb[:4], 10)[0].shape[0] == 4


def test_virtual_cells_leiden_follows_the_domains_and_asks_near_the_requested_count():
    pytest.importorskip("igraph")
    xy, emb, left = _two_domain_slide()
    cxy, cemb, labels = virtual_cells(xy, emb, 6, method="leiden", seed=0)
    n = len(cxy)
    assert n == len(np.unique(labels)) and abs(n - 6) <= 1
    for c in range(n):
        assert np.allclose(cxy[c], xy[labels == c].mean(0))
    purity = np.mean([max(left[labels == c].mean(), 1 - left[labels == c].mean()) for c in range(n)])
    assert purity > 0.95
    assert np.array_equal(labels, virtual_cells(xy, emb, 6, method="leiden", seed=0)[2])
    a = 0.7  # a rigid motion of the slide leaves the kNN graph, hence the clusters, unchanged
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    cxy2, _, labels2 = virtual_cells(xy @ rot.T - 30, emb, 6, method="leiden", seed=0)
    assert np.array_equal(labels, labels2) and np.allclose(cxy @ rot.T - 30, cxy2, atol=1e-6)
    # no more cells than virtual cells: one per cell, as with k-means (a 1-cell slide included)
    assert virtual_cells(xy[:4], emb[:4], 10, method="leiden")[0].shape[0] == 4
    assert virtual_cells(xy[:1], emb[:1], 10, method="leiden")[0].shape[0] == 1


def test_virtual_cells_leiden_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "igraph", None)  # import igraph now raises ImportError
    xy, emb, _ = _two_domain_slide()
    with pytest.raises(ImportError, match=r"stalign\[leiden\]"):
        virtual_cells(xy, emb, 4, method="leiden")
    with pytest.raises(ValueError, match="unknown clustering"):
        virtual_cells(np.zeros((3, 2)) + np.arange(3)[:, None], np.zeros((3, 4)), 2, method="dbscan")
