"""Macro scale: virtual cells = clusters of a whole slide on 0.2·xy + 0.8·PCA(embedding).

Each virtual cell has the mean position and the mean embedding of its cluster; they are prepended to every
sub-slice so each sub-slice sees the whole slide. Features: the xy coordinates, centred and divided by one
scalar (their RMS distance to the centroid, so a rotation of the slide rotates the features and the
clustering does not change), and the first principal components of the embedding, scaled to unit total RMS;
weighted 0.2 and 0.8. Clustering: k-means in torch (k-means++ seeding, deterministic for a seed, runs on the
embedding's device, e.g. the GPU) or Leiden (``stofm.leiden``; needs ``stalign[leiden]``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from stofm.subslice import check_coords
from stofm.util.errors import InputError, MissingDependencyError

XY_WEIGHT, EMB_WEIGHT = 0.2, 0.8


def virtual_cells(coords: Any, emb: Any, n_clusters: int, *, method: str = "kmeans", seed: int = 0,
                  n_pcs: int = 50, max_iter: int = 100, device: Any = None) -> tuple[Any, Any, Any]:
    """Cluster a slide into ``n_clusters`` virtual cells; returns (centres_xy (V,2), centres_emb (V,D), labels (N,)).

    ``coords`` (N, 2) and ``emb`` (N, D) are numpy arrays or torch tensors; torch inputs give torch outputs
    on ``emb``'s device, numpy inputs numpy outputs. V = min(n_clusters, N) for k-means; Leiden picks its
    resolution so V is close to ``n_clusters``. Empty clusters are dropped, so V can be smaller.
    """
    import torch

    as_torch = isinstance(emb, torch.Tensor)
    xy_np = check_coords(coords.detach().cpu().numpy() if isinstance(coords, torch.Tensor) else coords)
    dev = torch.device(device) if device is not None else (emb.device if as_torch else torch.device("cpu"))
    e = (emb.detach() if as_torch else torch.as_tensor(np.asarray(emb))).to(dev, torch.float32)
    if e.ndim != 2 or e.shape[0] != len(xy_np):
        raise ValueError(f"emb must have shape (N={len(xy_np)}, D), got {tuple(e.shape)}")
    if not torch.isfinite(e).all():
        raise ValueError("embeddings contain NaN/inf values")
    if n_clusters < 1:
        raise InputError(f"n_clusters must be >= 1, got {n_clusters}")
    xy = torch.as_tensor(xy_np, dtype=torch.float64, device=dev)
    feats = clustering_features(xy, e, n_pcs=n_pcs)
    if method == "kmeans":
        labels = kmeans(feats, min(n_clusters, len(feats)), seed=seed, max_iter=max_iter)
    elif method == "leiden":
        labels = torch.as_tensor(leiden(feats, n_clusters, seed=seed), device=dev)
    else:
        raise InputError(f"unknown clustering method {method!r}; use 'kmeans' or 'leiden'")
    labels = torch.unique(labels, return_inverse=True)[1]  # drop empty clusters, labels 0..V-1
    n = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=n).to(torch.float64)[:, None]
    cxy = torch.zeros(n, 2, dtype=torch.float64, device=dev).index_add_(0, labels, xy) / counts
    cemb = torch.zeros(n, e.shape[1], dtype=torch.float64, device=dev).index_add_(0, labels, e.double()) / counts
    if as_torch:
        return cxy.to(emb.dtype), cemb.to(emb.dtype), labels
    return cxy.cpu().numpy(), cemb.float().cpu().numpy(), labels.cpu().numpy()


def clustering_features(xy: Any, emb: Any, *, n_pcs: int = 50) -> Any:
    """0.2 · isotropically standardised xy  ‖  0.8 · PCA(emb) scaled to unit RMS, float32 (N, 2 + P)."""
    import torch

    xy = xy - xy.mean(0)
    xy = xy / xy.pow(2).sum(1).mean().sqrt().clamp_min(1e-12)
    e = emb.double() - emb.double().mean(0)
    q = min(n_pcs, e.shape[0], e.shape[1])
    if q > 0 and e.abs().max() > 0:
        vh = torch.linalg.svd(e, full_matrices=False)[2]
        pcs = e @ vh[:q].T
    else:
        pcs = e[:, :0]
    rms = pcs.pow(2).sum(1).mean().sqrt()
    pcs = pcs / rms if rms > 0 else pcs
    return torch.cat([XY_WEIGHT * xy, EMB_WEIGHT * pcs], dim=1).float()


def kmeans(x: Any, k: int, *, seed: int = 0, max_iter: int = 100, tol: float = 1e-5) -> Any:
    """Lloyd's k-means with k-means++ seeding on ``x`` (N, F) torch; labels (N,) int64 on ``x``'s device."""
    import torch

    n = x.shape[0]
    gen = torch.Generator().manual_seed(int(seed))
    centres = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[int(torch.randint(n, (1,), generator=gen))]
    d2 = (x - centres[0]).pow(2).sum(1)
    for i in range(1, k):
        w = d2.double().cpu()
        pick = int(torch.multinomial(w / w.sum(), 1, generator=gen)) if w.sum() > 0 else int(torch.randint(n, (1,), generator=gen))
        centres[i] = x[pick]
        d2 = torch.minimum(d2, (x - centres[i]).pow(2).sum(1))
    prev = None
    for _ in range(max_iter):
        labels = _assign(x, centres)
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)  # (N, k): sums by a matmul, fast on CPU/GPU
        counts = onehot.sum(0)
        new = torch.where(counts[:, None] > 0, (onehot.T @ x) / counts.clamp_min(1)[:, None], centres)
        centres = new
        inertia = float((x - centres[labels]).pow(2).sum())
        if prev is not None and prev - inertia <= tol * max(prev, 1e-12):
            break
        prev = inertia
    return _assign(x, centres)


def _assign(x: Any, centres: Any, *, chunk: int = 65536) -> Any:
    """Index of the nearest centre for each row of ``x`` (chunked to bound memory)."""
    import torch

    return torch.cat([torch.cdist(x[s:s + chunk], centres).argmin(1) for s in range(0, len(x), chunk)])


def leiden(feats: Any, n_clusters: int, *, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """Leiden clusters of ``feats`` with the resolution bisected so the count is close to ``n_clusters``;
    one cluster per cell when there are no more cells than ``n_clusters`` (as k-means)."""
    from stofm.leiden import MISSING, leiden_n_clusters

    if len(feats) <= n_clusters:
        return np.arange(len(feats))

    try:
        return leiden_n_clusters(feats, n_clusters, n_neighbors=n_neighbors, seed=seed)
    except ImportError as err:
        raise MissingDependencyError(f"virtual cells with method='leiden': {MISSING} (or use method='kmeans')") from err
