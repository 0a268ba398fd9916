"""The original SToFM SE(2) transformer (``stofm.original.se2.OriginalSE2``, its key names) behind the interface of
the project's ``SE2Transformer``: cell embeddings + coordinates in, ``{"cls", "virtual", "cells", "pair",
"cell_graph"}`` out. This is what a model config with ``"se2": {"arch": "original"}`` (``stofm-original``) builds.

The distance matrix is built from the coordinates exactly as the original pipeline does
(``stofm.original.pipeline.distance_matrix``), batched in torch: nodes [CLS at (0, 0)] + virtual cells + cells;
an exact kNN graph over all real nodes with k = min(50, n - 1) counting the node itself; virtual-cell rows and
columns full distances; every other 0 -> the far value (100); the CLS row and column 0; symmetrised by union; the
diagonal and padding 0. Coordinates must be in the original's frame (``geometry: "bbox"``: the slide's bounding-box
diagonal = 100, centred on its centre), since the CLS sits at the origin and takes part in the kNN graph.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stofm.original.se2 import CLS_TYPE, HYPER, NORM, PAD, OriginalSE2, OriginalSE2Config

MCM_INPUT = -100.0  # the original's masked-cell input value (every dimension)


def original_distances(nodes: torch.Tensor, types: torch.Tensor, *, k_neighbors: int = 50,
                       far: float = 100.0) -> torch.Tensor:
    """The original's (B, T, T) float32 distance matrix of node coordinates ``nodes`` (B, T, 2) with token types
    ``types`` (B, T) (1 CLS, 2 virtual, 0 cell, 3 padding; padding may sit anywhere). Computed in float64."""
    xy = nodes.double()
    pad = types == PAD
    b, t, _ = xy.shape
    full = (xy[:, :, None, :] - xy[:, None, :, :]).pow(2).sum(-1).sqrt()
    n_real = (~pad).sum(1)
    k = torch.clamp(n_real - 1, max=k_neighbors)  # self counted, as the original
    ranked = full.masked_fill(pad[:, None, :], float("inf"))
    order = torch.sort(ranked, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(t, device=xy.device).expand(b, t, t))
    knn = torch.where(rank < k[:, None, None], full, torch.zeros_like(full))
    hyper = types == HYPER
    a = torch.where(hyper[:, :, None] | hyper[:, None, :], full, knn)
    a = a.masked_fill(a == 0, far)
    is_cls = types == CLS_TYPE
    a = a.masked_fill(is_cls[:, :, None] | is_cls[:, None, :], 0.0)
    a = torch.where((a == far) & (a.transpose(1, 2) != far), a.transpose(1, 2), a)
    a = a.masked_fill(torch.eye(t, dtype=torch.bool, device=xy.device), 0.0)
    return a.masked_fill(pad[:, :, None] | pad[:, None, :], 0.0).float()


class OriginalArchSE2(nn.Module):
    """``OriginalSE2`` (as ``self.model``) fed from coordinates; the model-config keys map onto ``SToFMConfig``:
    dim -> hidden_size, depth -> num_hidden_layers, heads -> num_attention_heads, ffn_dim -> ffn_embedding_dim
    (default 3 x dim, the released 768 at 256), n_gaussians -> gaussian_hidden_dim, in_dim -> input_dim."""

    arch = "original"

    def __init__(self, *, dim: int, depth: int, heads: int, ffn_dim: int | None = None, n_gaussians: int = 128,
                 k_neighbors: int = 50, far_distance: float = 100.0, dropout: float = 0.1, in_dim: int | None = None,
                 activation: str = "gelu", arch: str = "original", attn_impl: str | None = None,
                 **switches: Any) -> None:
        super().__init__()
        if switches:
            raise ValueError(f"{sorted(switches)} are switches of the project's SE(2) (arch 'project'); the original "
                             "architecture is fixed (post-LN, ReLU Gaussian MLP, zero-distance mask, carried logits, "
                             "zero CLS, kNN over all nodes, no final LayerNorm)")
        if arch != "original":
            raise ValueError(f"OriginalArchSE2 builds arch='original', got {arch!r}")
        if k_neighbors < 1:
            raise ValueError(f"k_neighbors must be >= 1, got {k_neighbors}")
        cfg = OriginalSE2Config.from_dict({
            "input_dim": in_dim or dim, "hidden_size": dim, "num_hidden_layers": depth, "num_attention_heads": heads,
            "ffn_embedding_dim": ffn_dim or 3 * dim, "gaussian_hidden_dim": n_gaussians, "activation_fn": activation,
            "dropout": dropout, "attention_dropout": dropout, "activation_dropout": dropout})
        self.model = OriginalSE2(cfg)
        self.dim, self.heads = dim, heads
        self.k_neighbors, self.far_distance = int(k_neighbors), float(far_distance)

    def set_attn_impl(self, impl: str) -> None:
        """The original computes its logits explicitly (they are the next layer's bias); nothing to switch."""
        if impl not in ("manual", "sdpa"):
            raise ValueError(f"attn_impl must be 'manual' or 'sdpa', got {impl!r}")

    def inputs(self, cell_emb: torch.Tensor, coords: torch.Tensor, pad_mask: torch.Tensor | None = None,
               virtual_emb: torch.Tensor | None = None, virtual_coords: torch.Tensor | None = None,
               virtual_pad_mask: torch.Tensor | None = None, *, mask: torch.Tensor | None = None
               ) -> dict[str, Any]:
        """The original's forward inputs: ``token_embeddings`` (B, T, C), ``attn_bias`` (the distance matrix),
        ``token_types`` (B, T), node coordinates ``nodes`` (B, T, 2); T = 1 + V + N."""
        b, n, c = cell_emb.shape
        dev = cell_emb.device
        pad = torch.zeros(b, n, dtype=torch.bool, device=dev) if pad_mask is None else pad_mask.bool()
        if virtual_emb is None:
            virtual_emb, virtual_coords = cell_emb.new_zeros(b, 0, c), coords.new_zeros(b, 0, 2)
        if virtual_coords is None:
            raise ValueError("virtual_emb given without virtual_coords")
        v = virtual_emb.shape[1]
        vpad = (torch.zeros(b, v, dtype=torch.bool, device=dev) if virtual_pad_mask is None
                else virtual_pad_mask.bool())
        for xy, p, name in ((coords, pad, "coords"), (virtual_coords, vpad, "virtual_coords")):
            if (~torch.isfinite(xy).all(-1) & ~p).any():
                raise ValueError(f"{name} contain NaN/inf values at non-padded positions")
        if (pad.all(1) & vpad.all(1)).any():
            raise ValueError("a sub-slice in the batch has no cells (all padding)")
        cells = cell_emb
        if mask is not None:
            cells = cells.masked_fill(mask.bool()[..., None], MCM_INPUT)
        feats = torch.cat([cell_emb.new_zeros(b, 1, c), virtual_emb.to(cells.dtype), cells], 1)
        types = torch.tensor([CLS_TYPE] + [HYPER] * v + [NORM] * n, device=dev).expand(b, -1).clone()
        types[torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=dev), vpad, pad], 1)] = PAD
        nodes = torch.cat([coords.new_zeros(b, 1, 2), virtual_coords.to(coords.dtype), coords], 1)
        dist = original_distances(nodes, types, k_neighbors=self.k_neighbors, far=self.far_distance)
        return {"token_embeddings": feats, "attn_bias": dist, "token_types": types, "nodes": nodes}

    def forward(self, cell_emb: torch.Tensor, coords: torch.Tensor, pad_mask: torch.Tensor | None = None,
                virtual_emb: torch.Tensor | None = None, virtual_coords: torch.Tensor | None = None,
                virtual_pad_mask: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                return_pair: bool = True) -> dict:
        """As ``SE2Transformer.forward``; ``mask`` (B, N) sets those cells' input to -100 (the original's MCM)."""
        inp = self.inputs(cell_emb, coords, pad_mask, virtual_emb, virtual_coords, virtual_pad_mask, mask=mask)
        out = self.model(inp["token_embeddings"], inp["attn_bias"], inp["token_types"])
        h = out["last_hidden_state"]
        v = 1 + (0 if virtual_emb is None else virtual_emb.shape[1])
        cd = inp["attn_bias"][:, v:, v:]
        types = inp["token_types"][:, v:]
        real = types != PAD
        graph = (cd != self.far_distance) & real[:, :, None] & real[:, None, :]
        return {"cls": h[:, 0], "virtual": h[:, 1:v], "cells": h[:, v:],
                "pair": out["pair_rep"] if return_pair else None, "cell_graph": graph}


# the project SE(2)'s switches at the original's values (with ffn_dim 3 x dim and far_distance 100)
ORIGINAL_SWITCHES = {"norm": "post", "gaussian_act": "relu", "final_norm": False, "zero_distance_mask": True,
                     "gaussian_bias": "first", "carry_logits": True, "cls": "zero", "knn_over": "all"}


def to_project_state_dict(sd: dict[str, torch.Tensor], *, n_edge_types: int = 9) -> dict[str, torch.Tensor]:
    """An original ``SToFMModel`` state dict as the project ``SE2Transformer``'s (built with ``ORIGINAL_SWITCHES``
    and an input projection, ``in_dim != dim``): fused qkv = [q; k; v], one Gaussian affine for every edge type,
    token types mapped (project CLS, virtual, cell = original 1, 2, 0). The project's unused ``mask_token`` is
    not part of it (load with ``strict=False``)."""
    t = sd["token_type_embeddings.weight"]
    out = {"proj_in.weight": sd["embedding_layer.weight"], "proj_in.bias": sd["embedding_layer.bias"],
           "type_emb.weight": torch.stack([t[CLS_TYPE], t[HYPER], t[NORM]]),
           "dist_enc.means": sd["gaussian.means.weight"].view(-1), "dist_enc.stds": sd["gaussian.stds.weight"].view(-1),
           "dist_enc.mul.weight": sd["gaussian.linear.weight"].view(1, 1).expand(n_edge_types, 1).clone(),
           "dist_enc.bias.weight": sd["gaussian.linear.bias"].view(1, 1).expand(n_edge_types, 1).clone()}
    for i in (0, 2):
        for p in ("weight", "bias"):
            out[f"dist_enc.mlp.{i}.{p}"] = sd[f"gaussian.proj.{i}.{p}"]
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        o, n = f"encoder.layers.{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            out[n + "qkv." + p] = torch.cat([sd[o + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            out[n + "out." + p] = sd[o + "self_attn.out_proj." + p]
            out[n + "norm1." + p] = sd[o + "self_attn_layer_norm." + p]
            out[n + "norm2." + p] = sd[o + "final_layer_norm." + p]
            out[n + "ffn.0." + p] = sd[o + "fc1." + p]
            out[n + "ffn.3." + p] = sd[o + "fc2." + p]
    return out
