"""The original SToFM's path from raw coordinates and cell embeddings to SE(2) inputs (``model/extraction.py`` of
PharMolix/SToFM), step by step (``stofm.embed`` of a ``stofm-original`` model runs steps 1-3, ``OriginalArchSE2``
steps 4-6; these functions are the reference the golden tests and the original pretraining collator use):

1. coordinates centred on the bounding box and scaled so that its diagonal is 100;
2. hypernodes (virtual cells) for the whole slice: Leiden clusters of ``alpha * xy/max|xy| + (1-alpha) *
   PCA2(emb)/max|PCA2|`` (labels may be given), each the mean position and float32 mean embedding of a cluster;
3. tiles of about ``split_num`` cells on a square grid (x-major), larger tiles split with ``np.array_split``;
4. per tile the nodes [CLS at (0,0), zero features] + all hypernodes + the tile's cells, types 1, 2.., 0..;
5. the distance matrix: exact kNN over all nodes (k = min(50, n-1), self counted), hypernode rows/columns full
   distances, every other 0 -> 100, CLS row/column 0, symmetrised by union, diagonal 0, float32;
6. batches padded with zero features, distance 0, type 3 and index -1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stofm.util.errors import CoordinateError

FAR = 100.0
K_NEIGHBORS = 50


def normalize_coords(xy: np.ndarray) -> np.ndarray:
    """Centre on the bounding box, scale its diagonal to 100 (float64)."""
    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(0), xy.max(0)
    diag = float(np.sqrt(((hi - lo) ** 2).sum()))
    if not np.isfinite(diag) or diag == 0:
        raise CoordinateError("the coordinates span no area (all cells at one point, or NaN/inf)")
    return (xy - (hi + lo) / 2) / diag * 100.0


def clustering_space(norm_xy: np.ndarray, emb: np.ndarray, *, alpha: float = 0.2) -> np.ndarray:
    """``alpha * xy / max|xy| + (1 - alpha) * pca2 / max|pca2|`` (row norms), the space the original clusters."""
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2).fit_transform(np.asarray(emb, np.float64))
    xy = np.asarray(norm_xy, np.float64)
    return alpha * xy / np.linalg.norm(xy, axis=1).max() + (1 - alpha) * pca / np.linalg.norm(pca, axis=1).max()


def hypernodes(norm_xy: np.ndarray, emb: np.ndarray, labels: np.ndarray | None = None, *, alpha: float = 0.2,
               resolution: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hyper_xy (H, 2) float64, hyper_emb (H, D) float32, labels (N,)): one hypernode per cluster in sorted label
    order. Without ``labels``, Leiden on the 10-NN graph of :func:`clustering_space` (``stofm.leiden``; the
    original's scanpy/igraph labels depend on library versions, so pass them to reproduce a run exactly)."""
    if labels is None:
        from stofm.leiden import leiden

        labels = leiden(clustering_space(norm_xy, emb, alpha=alpha), n_neighbors=10, resolution=resolution,
                        seed=seed)
    labels = np.asarray(labels)
    emb = np.asarray(emb, np.float32)
    keys = np.unique(labels)
    xy = np.stack([np.asarray(norm_xy, np.float64)[labels == k].mean(0) for k in keys])
    he = np.stack([emb[labels == k].mean(0) for k in keys]).astype(np.float32)
    return xy, he, labels


def split_graph(norm_xy: np.ndarray, split_num: int) -> list[np.ndarray]:
    """Cell indices of each tile: a square grid of side sqrt(area / (N // split_num + 1)), x-major; empty tiles
    dropped; a tile with ``len // split_num >= 2`` split into that many parts."""
    xy = np.asarray(norm_xy, np.float64)
    n = len(xy)
    if n <= split_num:
        return [np.arange(n)]
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    side = np.sqrt((x1 - x0) * (y1 - y0) / (n // split_num + 1))
    tiles = []
    for i in range(int((x1 - x0) / side) + 1):
        in_x = (xy[:, 0] >= x0 + i * side) & (xy[:, 0] < x0 + (i + 1) * side)
        for j in range(int((y1 - y0) // side) + 1):
            idx = np.flatnonzero(in_x & (xy[:, 1] >= y0 + j * side) & (xy[:, 1] < y0 + (j + 1) * side))
            if len(idx) == 0:
                continue
            parts = len(idx) // split_num
            tiles.extend(np.array_split(idx, parts) if parts >= 2 else [idx])
    return tiles


def distance_matrix(nodes: np.ndarray, n_hyper: int) -> np.ndarray:
    """The original's (n, n) float32 distance matrix of one sub-slice (nodes: CLS, hypernodes, cells; step 5 of the
    module doc, ``stofm.original.se2.original_distances`` on one sub-slice)."""
    import torch

    from stofm.original.se2 import original_distances

    nodes = np.asarray(nodes, np.float64)
    types = np.r_[1, np.full(n_hyper, 2), np.zeros(len(nodes) - 1 - n_hyper)].astype(np.int64)
    return original_distances(torch.from_numpy(nodes)[None], torch.from_numpy(types)[None], k_neighbors=K_NEIGHBORS,
                              far=FAR)[0].numpy()


@dataclass
class SubSlice:
    """One model input: node features (n, D) float32, coordinates (n, 2), distance matrix, token types, and the
    cell index of each node (-1 for CLS and hypernodes)."""

    features: np.ndarray
    nodes: np.ndarray
    attn_bias: np.ndarray
    token_types: np.ndarray
    indices: np.ndarray


def build_subslices(norm_xy: np.ndarray, emb: np.ndarray, hyper_xy: np.ndarray, hyper_emb: np.ndarray, *,
                    split_num: int = 1000, tiles: list[np.ndarray] | None = None) -> list[SubSlice]:
    """The sub-slices of a slice (step 3-5 of the module doc); ``tiles`` (cell indices) replace step 3."""
    emb = np.asarray(emb, np.float32)
    h, d = len(hyper_xy), emb.shape[1]
    out = []
    for cells in split_graph(norm_xy, split_num) if tiles is None else tiles:
        nodes = np.concatenate([np.zeros((1, 2)), hyper_xy, np.asarray(norm_xy, np.float64)[cells]])
        feats = np.concatenate([np.zeros((1, d), np.float32), hyper_emb, emb[cells]]).astype(np.float32)
        types = np.concatenate([[1], np.full(h, 2), np.zeros(len(cells))]).astype(np.int64)
        idx = np.concatenate([np.full(1 + h, -1), cells]).astype(np.int64)
        out.append(SubSlice(feats, nodes, distance_matrix(nodes, h), types, idx))
    return out


def collate(subs: list[SubSlice]) -> dict[str, Any]:
    """Pad a batch to its longest sub-slice: features 0, distance 0, type 3, index -1 (torch tensors)."""
    import torch

    n, d, b = max(len(s.indices) for s in subs), subs[0].features.shape[1], len(subs)
    feats, bias = np.zeros((b, n, d), np.float32), np.zeros((b, n, n), np.float32)
    types, idx = np.full((b, n), 3, np.int64), np.full((b, n), -1, np.int64)
    for i, s in enumerate(subs):
        m = len(s.indices)
        feats[i, :m], bias[i, :m, :m], types[i, :m], idx[i, :m] = s.features, s.attn_bias, s.token_types, s.indices
    return {k: torch.from_numpy(v) for k, v in
            (("token_embeddings", feats), ("attn_bias", bias), ("token_types", types), ("indices", idx))}

