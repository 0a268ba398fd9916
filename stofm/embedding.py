"""Embed whole slides of any size with a SToFM: per-cell (``embed``) and per-niche (``embed_niches``) vectors.

A slide is prepared once (``prepare_slide``): cell embeddings from the cell encoder (batched), coordinates
scaled to a diameter of 100, virtual cells clustered once over the whole slide, sub-slices by tiling. The
SE(2) transformer then runs over batches of padded sub-slices, so memory is bounded by
``batch_size`` × (virtual + max_cells)² pair entries whatever the slide size.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stofm.subslice import CoordinateError, check_coords, scale_to_diameter, tile_slide
from stofm.util.errors import InputError


@dataclass
class Slide:
    """One slide ready for the SE(2) transformer (torch tensors on the model's device)."""

    coords: Any            # (N, 2) float32, diameter 100
    cell_emb: Any          # (N, C) float32
    virtual_coords: Any    # (V, 2)
    virtual_emb: Any       # (V, C)
    tiles: list[np.ndarray]
    scale: float
    info: dict = field(default_factory=dict)


def slide_inputs(adata: Any, *, layer: str | None = None, spatial_key: str = "spatial",
                 gene_key: str | None = None, input_kind: str = "auto", where: str = "adata") -> tuple:
    """(expression matrix, genes, coords (N,2) float64, input_kind) of an AnnData, with clear errors."""
    if spatial_key not in adata.obsm:
        raise CoordinateError(f"{where} has no obsm[{spatial_key!r}] with cell/spot coordinates "
                              f"(obsm keys: {list(adata.obsm.keys())})")
    coords = check_coords(np.asarray(adata.obsm[spatial_key])[:, :2], what=f"{where}.obsm[{spatial_key!r}]")
    X, genes = adata_expression(adata, layer=layer, gene_key=gene_key, where=where)
    if input_kind == "auto":
        input_kind = "counts" if _looks_like_counts(X) else "log1p"
    return X, genes, coords, input_kind


def adata_expression(adata: Any, *, layer: str | None = None, gene_key: str | None = None,
                     where: str = "adata") -> tuple[Any, list[str]]:
    """(``layers[layer]`` or ``X``, gene names from ``var[gene_key]`` or ``var_names``) of an AnnData; a missing
    layer, column or matrix is one error naming ``where``."""
    if layer is not None and layer not in adata.layers:
        raise InputError(f"{where}: no layer {layer!r} (layers: {list(adata.layers)})")
    if gene_key is not None and gene_key not in adata.var:
        raise InputError(f"{where}: no var column {gene_key!r} (columns: {list(adata.var.columns)})")
    X = adata.X if layer is None else adata.layers[layer]
    if X is None:
        raise InputError(f"{where} has no expression matrix (X is None)")
    return X, [str(g) for g in (adata.var[gene_key] if gene_key else adata.var_names)]


def check_expression_values(X: Any, genes: list[str], cells: Any, *, where: str) -> None:
    """Counts or log1p values only: NaN, infinite or negative entries are one error naming ``where``, how many
    there are and the first one (its cell and gene)."""
    import scipy.sparse as sp

    M = sp.coo_matrix(X) if sp.issparse(X) else np.asarray(X)
    vals = M.data if sp.issparse(X) else M
    bad = ~np.isfinite(vals) | (vals < 0)
    if not bad.any():
        return
    if sp.issparse(X):
        k = int(np.argmax(bad))
        row, col, value = int(M.row[k]), int(M.col[k]), M.data[k]
    else:
        row, col = (int(i) for i in np.argwhere(bad)[0])
        value = M[row, col]
    raise InputError(f"{where} has {int(bad.sum())} NaN, infinite or negative values (e.g. {float(value)} for cell "
                     f"{cells[row]!r}, gene {genes[col]!r}); pass counts or log1p-normalised values")


def _looks_like_counts(X: Any, n: int = 2000) -> bool:
    import scipy.sparse as sp

    block = X[: min(n, X.shape[0])]
    vals = block.data if sp.issparse(block) else np.asarray(block).ravel()
    return bool(vals.size) and bool(np.all(vals >= 0) and np.allclose(vals, np.round(vals)) and vals.max() > 1)


def prepare_slide(adata: Any, model: Any, *, layer: str | None = None, spatial_key: str = "spatial",
                  gene_key: str | None = None, input_kind: str = "auto", n_virtual: int | None = None,
                  cells_per_tile: int | None = None, max_cells: int | None = None, seed: int = 0,
                  cluster_method: str | None = None, cell_key: str | None = None, labels_key: str | None = None,
                  encode_batch_size: int = 512, progress: bool = False, where: str = "adata") -> Slide:
    """Cell embeddings, scaled coordinates, virtual cells (computed once) and sub-slices of one slide.

    The model config chooses the ``geometry`` ("diameter": slide diameter = 100, from 0; "bbox": the original's
    bounding-box diagonal = 100, centred), the ``tiling`` ("grid" or the original's "original") and, unless given,
    the ``cluster_method`` ("kmeans", "leiden", or "original": the original's Leiden hypernodes, count free).
    ``cell_key``: precomputed cell embeddings in ``obsm[cell_key]`` instead of the cell encoder; ``labels_key``:
    one virtual cell per label of ``obs[labels_key]`` (the original's hypernodes from given Leiden labels). A
    Geneformer cell encoder matches genes by ``var['gene_ids']`` (Ensembl) when present and no ``gene_key`` is given."""
    import torch

    if gene_key is None and model.cell_encoder.kind == "geneformer" and "gene_ids" in adata.var:
        gene_key = "gene_ids"
    X, genes, coords, kind = slide_inputs(adata, layer=layer, spatial_key=spatial_key, gene_key=gene_key,
                                          input_kind=input_kind, where=where)
    device = next(model.parameters()).device
    if cell_key is None:
        matched = len(set(model.genes) & set(genes))
        if matched == 0:
            raise InputError(f"none of the model's {len(model.genes)} genes is among the {len(genes)} genes of "
                             f"{where} (e.g. model {model.genes[:3]}, data {genes[:3]}); Ensembl IDs vs symbols? "
                             "try gene_key='gene_ids'")
        check_expression_values(X, genes, adata.obs_names, where=f"{where}.{'X' if layer is None else layer}")
        emb = model.encode_cells(X, genes, input_kind=kind, batch_size=encode_batch_size, progress=progress)
    else:
        matched, emb = 0, torch.as_tensor(_given_cell_embeddings(adata, cell_key, model, where))
    emb = emb.float().to(device)
    cfg = model.config
    cluster_method = cluster_method or cfg.get("cluster_method", "kmeans")
    xy, scale = _model_frame(coords, cfg.get("geometry", "diameter"))
    n_virtual = int(cfg.get("n_virtual", 64) if n_virtual is None else n_virtual)
    per_tile = int(cells_per_tile or cfg.get("cells_per_tile", 1000))
    if cfg.get("tiling", "grid") == "original":
        from stofm.original.pipeline import split_graph

        tiles = [np.sort(t) for t in split_graph(xy, per_tile)]
    else:
        tiles = tile_slide(xy, cells_per_tile=per_tile,
                           max_cells=max_cells if max_cells is not None else cfg.get("max_cells"), scale=False)
    txy = torch.as_tensor(xy, dtype=torch.float32, device=device)
    if labels_key is not None:
        cluster_method = f"obs[{labels_key!r}]"
    if cluster_method == "original" or labels_key is not None:
        from stofm.original.pipeline import hypernodes

        hxy, hemb, _ = hypernodes(xy, emb.cpu().numpy(), _given_labels(adata, labels_key, where), seed=seed)
        vxy = torch.as_tensor(hxy, dtype=torch.float32, device=device)
        vemb = torch.as_tensor(hemb, dtype=torch.float32, device=device)
    elif n_virtual > 0:
        from stofm.virtual_cells import virtual_cells

        vxy, vemb, _ = virtual_cells(txy.double(), emb, n_virtual, method=cluster_method, seed=seed)
        vxy, vemb = vxy.float(), vemb.float()
    else:
        vxy, vemb = txy.new_zeros(0, 2), emb.new_zeros(0, emb.shape[1])
    info = {"n_cells": len(xy), "n_tiles": len(tiles), "n_virtual": len(vxy), "cluster_method": cluster_method,
            "input_kind": kind, "cell_embeddings": cell_key or "cell encoder",
            "genes_matched": matched, "genes_model": len(model.genes), "coord_scale": float(scale)}
    return Slide(coords=txy, cell_emb=emb, virtual_coords=vxy, virtual_emb=vemb, tiles=tiles, scale=scale,
                 info=info)


def _given_cell_embeddings(adata: Any, key: str, model: Any, where: str) -> np.ndarray:
    """``obsm[key]`` as (N, C) float32 cell embeddings, C the model's cell-embedding width."""
    if key not in adata.obsm:
        raise InputError(f"{where} has no obsm[{key!r}] with cell embeddings (obsm keys: {list(adata.obsm)})")
    emb = np.asarray(adata.obsm[key], np.float32)
    width = model.cell_encoder.out_dim
    if emb.ndim != 2 or emb.shape[1] != width:
        raise InputError(f"{where}.obsm[{key!r}] has shape {emb.shape}; the SE(2) model takes {width}-d cell "
                         "embeddings")
    return emb


def _given_labels(adata: Any, key: str | None, where: str) -> np.ndarray | None:
    """``obs[key]`` as an array (None without a key)."""
    if key is None:
        return None
    if key not in adata.obs:
        raise InputError(f"{where} has no obs[{key!r}] with cluster labels (obs columns: {list(adata.obs)})")
    return adata.obs[key].to_numpy()


def _model_frame(coords: np.ndarray, geometry: str) -> tuple[np.ndarray, float]:
    """(model coordinates, units per input unit) of a slide under the config's ``geometry``."""
    if geometry == "diameter":
        return scale_to_diameter(coords)
    if geometry != "bbox":
        raise InputError(f"geometry must be 'diameter' or 'bbox', got {geometry!r}")
    from stofm.original.pipeline import normalize_coords
    from stofm.util.geometry import bbox_units_per_um

    return normalize_coords(coords), bbox_units_per_um(coords)


def collate_subslices(parts: Sequence[tuple[Slide, np.ndarray]]) -> dict:
    """Pad sub-slices (slide, cell indices) to one length; virtual cells of each one's slide prepended."""
    import torch

    first = parts[0][0]
    dev, c = first.cell_emb.device, first.cell_emb.shape[1]
    b, n = len(parts), max(len(idx) for _, idx in parts)
    v = max(len(s.virtual_coords) for s, _ in parts)
    out = {"cell_emb": torch.zeros(b, n, c, device=dev), "coords": torch.zeros(b, n, 2, device=dev),
           "pad_mask": torch.ones(b, n, dtype=torch.bool, device=dev),
           "virtual_emb": torch.zeros(b, v, c, device=dev), "virtual_coords": torch.zeros(b, v, 2, device=dev),
           "virtual_pad_mask": torch.ones(b, v, dtype=torch.bool, device=dev)}
    for i, (s, idx) in enumerate(parts):
        t = torch.as_tensor(idx, dtype=torch.long, device=dev)
        out["cell_emb"][i, :len(t)] = s.cell_emb[t]
        out["coords"][i, :len(t)] = s.coords[t]
        out["pad_mask"][i, :len(t)] = False
        k = len(s.virtual_coords)
        out["virtual_emb"][i, :k], out["virtual_coords"][i, :k] = s.virtual_emb, s.virtual_coords
        out["virtual_pad_mask"][i, :k] = False
    return out


def _autocast(device: Any, dtype: str | None):
    import contextlib

    import torch

    if dtype in (None, "fp32", "float32"):
        return contextlib.nullcontext()
    if dtype not in ("bf16", "bfloat16"):
        raise InputError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def embed(adata: Any, model: Any, *, batch_size: int = 8, key_added: str = "X_stofm", device: Any = None,
          dtype: str | None = None, key_cells: str | None = None, progress: bool = True, **slide_kw: Any) -> Any:
    """Per-cell SToFM embeddings of a whole slide into ``adata.obsm[key_added]`` (N, dim); returns ``adata``.

    ``slide_kw`` go to ``prepare_slide`` (layer, spatial_key, gene_key, input_kind, n_virtual, cells_per_tile,
    max_cells, seed, cluster_method, cell_key, labels_key). ``key_cells`` also stores the cell encoder's
    embeddings. A summary goes to ``adata.uns['stofm']``.
    """
    import torch
    from tqdm.auto import tqdm

    if device is not None:
        model = model.to(device)
    model.eval()
    t0 = time.perf_counter()
    slide = prepare_slide(adata, model, progress=progress, **slide_kw)
    dev = slide.coords.device
    t1 = time.perf_counter()
    out = torch.empty(len(slide.coords), model.dim, dtype=torch.float32)
    order = sorted(slide.tiles, key=len, reverse=True)  # similar lengths per batch: little padding
    with torch.no_grad(), _autocast(dev, dtype):
        for start in tqdm(range(0, len(order), batch_size), desc="stofm embed", disable=not progress):
            chunk = order[start:start + batch_size]
            res = model(**collate_subslices([(slide, idx) for idx in chunk]), return_pair=False)
            for i, idx in enumerate(chunk):
                out[torch.as_tensor(idx)] = res["cells"][i, :len(idx)].float().cpu()
    adata.obsm[key_added] = out.numpy()
    seconds = {"prepare": t1 - t0, "transformer": time.perf_counter() - t1}  # prepare: encoder + clusters + tiles
    if key_cells:
        adata.obsm[key_cells] = slide.cell_emb.float().cpu().numpy()
    adata.uns["stofm"] = {**slide.info, "key_added": key_added, "dim": model.dim, "seconds": seconds,
                          "model": str(model.config.get("name", "stofm"))}
    return adata


def embed_niches(adata: Any, model: Any, *, n_neighbors: int = 16, neighbors: np.ndarray | None = None,
                 batch_size: int = 64, key_added: str = "X_stofm_niche", device: Any = None,
                 dtype: str | None = None, progress: bool = True, **slide_kw: Any) -> Any:
    """Per-niche embeddings: the [CLS] output for each cell's niche (itself + its neighbours + the slide's
    virtual cells) into ``adata.obsm[key_added]`` (N, dim). The niches: ``stofm.util.knn.neighbor_indices`` (the
    shards' kNN, itself first, K clipped to N), or ``neighbors`` (N, K) (e.g. a shard's ``neighbors``; entries < 0
    are treated as absent)."""
    import torch
    from tqdm.auto import tqdm

    from stofm.util.knn import neighbor_indices

    if device is not None:
        model = model.to(device)
    model.eval()
    slide = prepare_slide(adata, model, progress=progress, **{"cells_per_tile": 10**9, **slide_kw})
    n = len(slide.coords)
    if neighbors is None:
        nb = neighbor_indices(slide.coords.cpu().numpy(), min(int(n_neighbors), n))
    else:
        nb = np.asarray(neighbors)
        if nb.ndim != 2 or nb.shape[0] != n or (nb >= n).any():
            raise InputError(f"neighbors must be (N={n}, K) indices < {n}, got shape {nb.shape}")
    out = torch.empty(n, model.dim, dtype=torch.float32)
    with torch.no_grad(), _autocast(slide.coords.device, dtype):
        for start in tqdm(range(0, n, batch_size), desc="stofm niches", disable=not progress):
            rows = range(start, min(start + batch_size, n))
            res = model(**collate_subslices([(slide, nb[i][nb[i] >= 0]) for i in rows]), return_pair=False)
            out[start:start + len(rows)] = res["cls"].float().cpu()
    adata.obsm[key_added] = out.numpy()
    adata.uns["stofm_niche"] = {**slide.info, "n_neighbors": int(nb.shape[1]), "key_added": key_added}
    return adata
