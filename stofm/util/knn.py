"""The k nearest spots (or cells) of every spot, itself first: shards' ``neighbors`` and stofm's niches."""
from __future__ import annotations

import numpy as np


def neighbor_indices(coords: np.ndarray, k: int) -> np.ndarray:
    """(N, k) int32 indices of the k nearest spots, the spot itself first; -1 fills rows when N < k."""
    from scipy.spatial import cKDTree

    n = len(coords)
    out = np.full((n, k), -1, dtype=np.int32)
    if n == 0 or k < 1:
        return out
    kk = min(k, n)
    _, idx = cKDTree(coords).query(coords, k=kk)
    idx = idx.reshape(n, kk)
    for i in np.flatnonzero(idx[:, 0] != np.arange(n)):  # coincident spots: put the spot itself first
        rest = [j for j in idx[i] if j != i][: kk - 1]
        idx[i] = [i, *rest]
    out[:, :kk] = idx
    return out
