"""Leiden clustering of feature vectors: an exact kNN graph in torch (chunked, on the features' device) and
igraph's Leiden (modularity with a resolution, weighted edges). Needs ``pip install 'stalign[leiden]'``.

The graph: each point joined to its ``n_neighbors`` nearest points (Euclidean), edge weight
exp(-d² / (σ_i σ_j)) with σ_i the distance to the point's farthest kept neighbour (the self-tuning kernel of
Zelnik-Manor & Perona), made symmetric by keeping the larger of the two directions. Used for the virtual cells
of ``stofm.virtual_cells`` and the spatial domains of ``stalign.tasks.domains``.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np

from stofm.util.errors import InputError, MissingDependencyError

MISSING = "Leiden clustering needs igraph: pip install 'stalign[leiden]'"


def _igraph() -> Any:
    try:
        import igraph
    except ImportError as err:
        raise MissingDependencyError(MISSING) from err
    return igraph


def knn(x: Any, n_neighbors: int, *, chunk: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``n_neighbors`` nearest neighbours of each row of ``x`` (N, F), itself excluded: (indices, distances),
    each (N, k) numpy with k = min(n_neighbors, N - 1). ``x`` may be numpy or a torch tensor (kept on its device)."""
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.detach().float()
    n = t.shape[0]
    k = min(int(n_neighbors), n - 1)
    if k < 1:
        raise InputError(f"a kNN graph needs at least 2 points, got {n}")
    idx, dist = [], []
    for s in range(0, n, chunk):
        d = torch.cdist(t[s:s + chunk], t)
        rows = torch.arange(s, min(s + chunk, n), device=t.device)
        d[rows - s, rows] = float("inf")  # not one's own neighbour
        dk, ik = torch.topk(d, k, dim=1, largest=False)
        idx.append(ik.cpu())
        dist.append(dk.cpu())
    return torch.cat(idx).numpy(), torch.cat(dist).double().numpy()


def knn_graph(x: Any, n_neighbors: int = 15) -> Any:
    """The weighted, undirected kNN graph of ``x`` as an ``igraph.Graph`` (edge attribute ``weight``)."""
    import scipy.sparse as sp

    ig = _igraph()
    idx, dist = knn(x, n_neighbors)
    n, k = idx.shape
    sigma = np.maximum(dist[:, -1], 1e-12)
    rows = np.repeat(np.arange(n), k)
    w = np.exp(-dist.ravel() ** 2 / (sigma[rows] * sigma[idx.ravel()]))
    w = np.maximum(w, 1e-12)  # an edge stays an edge even when far
    a = sp.csr_matrix((w, (rows, idx.ravel())), shape=(n, n))
    a = a.maximum(a.T).tocoo()
    keep = a.row < a.col
    g = ig.Graph(n=n, edges=np.column_stack([a.row[keep], a.col[keep]]).tolist(), directed=False)
    g.es["weight"] = a.data[keep].tolist()
    return g


def leiden_graph(g: Any, *, resolution: float = 1.0, seed: int = 0, n_iterations: int = 2) -> np.ndarray:
    """Leiden communities (modularity, ``resolution``) of an igraph graph; labels (N,) int, same seed same labels."""
    ig = _igraph()
    try:
        ig.set_random_number_generator(random.Random(int(seed)))
        part = g.community_leiden(objective_function="modularity", weights="weight", resolution=float(resolution),
                                  n_iterations=n_iterations)
    finally:
        ig.set_random_number_generator(random)
    return np.asarray(part.membership, dtype=np.int64)


def leiden(x: Any, *, resolution: float = 1.0, n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Leiden labels (N,) of the rows of ``x`` at a given ``resolution``."""
    if resolution <= 0:
        raise InputError(f"resolution must be > 0, got {resolution}")
    return leiden_graph(knn_graph(x, n_neighbors), resolution=resolution, seed=seed)


def leiden_n_clusters(x: Any, n_clusters: int, *, n_neighbors: int = 15, seed: int = 0,
                      max_steps: int = 20) -> np.ndarray:
    """Leiden labels with the resolution bisected (0.01..50, geometric) until there are ``n_clusters`` clusters;
    when the bracket closes (within 2 %) or after ``max_steps`` the labels with the nearest count are kept.
    The kNN graph is built once."""
    g = knn_graph(x, n_neighbors)
    lo, hi, best = 0.01, 50.0, None
    for _ in range(max_steps):
        res = (lo * hi) ** 0.5
        labels = leiden_graph(g, resolution=res, seed=seed)
        got = len(np.unique(labels))
        if best is None or abs(got - n_clusters) < abs(best[0] - n_clusters):
            best = (got, labels)
        if got == n_clusters:
            break
        lo, hi = (res, hi) if got < n_clusters else (lo, res)
        if hi / lo < 1.02:  # the bracket is closed: the count jumps over n_clusters here
            break
    return best[1]
