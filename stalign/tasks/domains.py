"""Zero-shot spatial domains: cluster the embeddings of a slide (k-means, or Leiden when igraph is
installed: ``stalign[leiden]``), score them against annotations (ARI, NMI), and plot them over the slide."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.tasks.ann_index import unit_rows
from stofm.util.errors import InputError


def cluster_domains(embeddings: np.ndarray, *, n_domains: int | None = None, method: str = "kmeans",
                    coords: np.ndarray | None = None, spatial_weight: float = 0.0, resolution: float = 1.0,
                    n_neighbors: int = 15, seed: int = 0) -> np.ndarray:
    """Domain label per spot (int array) from L2-normalised ``embeddings``.

    ``spatial_weight`` > 0 appends standardised ``coords`` scaled by that weight (smoother domains).
    k-means picks ``n_domains`` by silhouette over 2..10 when not given; Leiden uses ``resolution``.
    """
    x = unit_rows(embeddings, np.float64)
    if spatial_weight > 0:
        if coords is None:
            raise InputError("spatial_weight > 0 needs coords")
        c = np.asarray(coords, np.float64)
        c = (c - c.mean(0)) / (c.std(0).mean() + 1e-12)
        x = np.hstack([x, spatial_weight * c / np.sqrt(c.shape[1])])
    if len(x) < 2:
        raise InputError(f"need at least 2 spots to find domains, got {len(x)}")
    if method == "kmeans":
        return _kmeans(x, n_domains, seed)
    if method == "leiden":
        from stofm.leiden import leiden

        return leiden(x, resolution=resolution, n_neighbors=n_neighbors, seed=seed)
    raise InputError(f"unknown clustering method {method!r}: use 'kmeans' or 'leiden'")


def _kmeans(x: np.ndarray, n_domains: int | None, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if n_domains is not None:
        if not 1 <= n_domains <= len(x):
            raise InputError(f"n_domains must lie in 1..{len(x)} (the number of spots), got {n_domains}")
        return KMeans(n_clusters=n_domains, n_init=10, random_state=seed).fit_predict(x)
    best, best_score = None, -np.inf
    for k in range(2, min(10, len(x) - 1) + 1):
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
        score = silhouette_score(x, labels) if len(set(labels)) > 1 else -1.0
        if score > best_score:
            best, best_score = labels, score
    return best if best is not None else np.zeros(len(x), dtype=int)


def score_domains(labels: Sequence[Any], annotations: Sequence[Any]) -> dict[str, float]:
    """ARI and NMI of ``labels`` against ``annotations`` (spots with a missing annotation are left out)."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    labels, truth = np.asarray(labels), np.asarray(annotations, dtype=object)
    if len(labels) != len(truth):
        raise InputError(f"{len(labels)} domain labels but {len(truth)} annotations")
    import pandas as pd

    keep = np.array([not pd.isna(t) and str(t) != "" for t in truth])
    if keep.sum() < 2:
        raise InputError("fewer than two annotated spots: cannot score domains")
    t = truth[keep].astype(str)
    return {"ari": float(adjusted_rand_score(t, labels[keep])),
            "nmi": float(normalized_mutual_info_score(t, labels[keep])), "n_scored": int(keep.sum())}


def plot_domains(coords_px: np.ndarray, labels: Sequence[Any], path: str | Path, *,
                 thumbnail: np.ndarray | None = None, downsample: float = 1.0,
                 spot_diameter_px: float | None = None, title: str = "spatial domains", dpi: int = 120) -> Path:
    """Scatter PNG of the domains over the coordinates (and the thumbnail when given)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from stalign.tasks.heatmaps import draw_spots, new_axes, save_figure

    coords = np.asarray(coords_px, np.float64).reshape(-1, 2) / float(downsample)
    labels = np.asarray(labels)
    if len(labels) != len(coords):
        raise InputError(f"{len(labels)} labels for {len(coords)} spots")
    if spot_diameter_px is None:
        from scipy.spatial import cKDTree

        spot_diameter_px = (float(cKDTree(coords).query(coords, k=2)[0][:, 1].min()) if len(coords) > 1
                            else 10.0) * downsample
    names = sorted(set(labels.tolist()), key=str)
    palette = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    colours = {n: palette(i % palette.N) for i, n in enumerate(names)}
    fig, ax = new_axes(thumbnail, coords)
    draw_spots(ax, coords, float(spot_diameter_px) / float(downsample), colors=[colours[v] for v in labels.tolist()])
    ax.legend(handles=[Patch(color=colours[n], label=str(n)) for n in names], loc="center left",
              bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    ax.set_title(title)
    return save_figure(fig, Path(path), dpi)
