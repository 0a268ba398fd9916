"""``stofm embed`` for a converted original SToFM: AnnData in, ``obsm['X_stofm']`` out, by the original pipeline."""
from __future__ import annotations

from typing import Any

import numpy as np

from stofm.util.errors import CoordinateError, InputError


def cell_embeddings(adata: Any, cell_encoder: Any, *, key: str | None = None, layer: str | None = None) -> np.ndarray:
    """Per-cell input embeddings: ``adata.obsm[key]`` when given, else the cell BERT over the counts (``X`` or
    ``layer``), genes from ``var['gene_ids']`` (Ensembl, as Geneformer) when present, else ``var_names``."""
    if key is not None:
        if key not in adata.obsm:
            raise InputError(f"no obsm[{key!r}] with cell embeddings (obsm has {list(adata.obsm)})")
        return np.asarray(adata.obsm[key], np.float32)
    if cell_encoder is None:
        raise InputError("this SToFM folder has no cell BERT: give precomputed cell embeddings (--cell-embeddings KEY)"
                         " or convert with --cell-bert")
    genes = adata.var["gene_ids"] if "gene_ids" in adata.var else adata.var_names
    counts = adata.layers[layer] if layer else adata.X
    return cell_encoder.encode_counts(counts, [str(g) for g in genes])


def embed_original(adata: Any, model: Any, cell_encoder: Any = None, *, cell_key: str | None = None,
                   labels_key: str | None = None, split_num: int = 1000, key_added: str = "X_stofm",
                   progress: bool = False) -> Any:
    """Write the original SToFM's per-cell embeddings of one slide into ``adata.obsm[key_added]``."""
    from stofm.original.pipeline import embed_slice

    if "spatial" not in adata.obsm:
        raise CoordinateError(f"no obsm['spatial'] with cell coordinates (obsm has {list(adata.obsm)})")
    se2 = getattr(model, "model", model)  # the backbone of a model converted with its heads
    emb = cell_embeddings(adata, cell_encoder, key=cell_key)
    if emb.shape[1] != se2.config.input_dim:
        raise InputError(f"cell embeddings are {emb.shape[1]}-d, the SE(2) model takes {se2.config.input_dim}")
    labels = None
    if labels_key is not None:
        if labels_key not in adata.obs:
            raise InputError(f"no obs[{labels_key!r}] with cluster labels")
        labels = adata.obs[labels_key].to_numpy()
    adata.obsm[key_added] = embed_slice(se2, np.asarray(adata.obsm["spatial"])[:, :2], emb, labels=labels,
                                        split_num=split_num, progress=progress)
    adata.uns["stofm"] = {"architecture": "original", "split_num": int(split_num),
                          "cell_embeddings": cell_key or "cell_bert", "labels": labels_key or "leiden"}
    return adata
