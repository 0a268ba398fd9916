"""SToFM's SE(2)-invariant transformer over a sub-slice: tokens [CLS] + virtual cells + cells.

Only pairwise distances enter the model, so its outputs do not change when the coordinates are rotated or
translated. Distances: among cells, the kNN graph (k nearest real cells, ties at the k-th distance kept, made
symmetric; fewer than k+1 real cells -> every cell is a neighbour) with a large constant (``far_distance``)
for non-neighbours; virtual cells get full distances to everything; [CLS] has no position and gets distance 0
to all tokens, told apart by its own edge type. Each distance goes through learnable Gaussian kernels
(per-edge-type affine, learnable means/stds) and an MLP to one attention bias per head. Each layer's
pre-softmax logits (q·k/√d + bias) become the next layer's bias (the pair representation, as in Uni-Mol).

This is the project's variant (``stofm-tiny/-small/-base``). The original SToFM (``arch: "original"``,
``stofm-original``, the released weights) is one other implementation: ``stofm.original.se2``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stofm.util.errors import InputError

CLS, VIRTUAL, CELL = 0, 1, 2
N_TYPES = 3
PAD_LOGIT = -1e4
# options that once moved this SE(2) towards the original SToFM (removed); a saved config may still name them at the
# project's values, which is all this SE(2) is
RETIRED = {"norm": "pre", "gaussian_act": "gelu", "final_norm": True, "zero_distance_mask": False,
           "gaussian_bias": "first", "carry_logits": True, "cls": "learned", "knn_over": "cells"}


class GaussianDistanceEncoding(nn.Module):
    """Distance -> ``n_gaussians`` Gaussian kernels (learnable means/stds, per-edge-type affine) -> MLP -> heads."""

    def __init__(self, *, n_gaussians: int, heads: int, max_distance: float, n_edge_types: int = N_TYPES ** 2):
        super().__init__()
        self.means = nn.Parameter(torch.from_numpy(_geomspace(1e-2, max_distance, n_gaussians)).float())
        self.stds = nn.Parameter(0.5 * self.means.detach().clone() + 1e-2)
        self.mul = nn.Embedding(n_edge_types, 1)
        self.bias = nn.Embedding(n_edge_types, 1)
        nn.init.ones_(self.mul.weight)
        nn.init.zeros_(self.bias.weight)
        self.mlp = nn.Sequential(nn.Linear(n_gaussians, n_gaussians), nn.GELU(), nn.Linear(n_gaussians, heads))

    def forward(self, dist: torch.Tensor, etype: torch.Tensor) -> torch.Tensor:
        """``dist`` (...,) float, ``etype`` (...,) long -> (..., heads), computed in float32."""
        x = self.mul(etype).squeeze(-1) * dist.float() + self.bias(etype).squeeze(-1)
        std = self.stds.abs() + 1e-5
        g = torch.exp(-0.5 * ((x[..., None] - self.means) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
        with torch.autocast(device_type=dist.device.type, enabled=False):
            return self.mlp(g.float())


def _geomspace(lo: float, hi: float, n: int) -> Any:
    import numpy as np

    return np.geomspace(lo, hi, n) if n > 1 else np.array([hi])


class SE2Layer(nn.Module):
    """Pre-norm self-attention with an additive pair bias + FFN; returns (tokens, pre-softmax logits)."""

    def __init__(self, *, dim: int, heads: int, dropout: float, ffn_dim: int | None = None,
                 attn_impl: str = "manual"):
        super().__init__()
        if dim % heads:
            raise InputError(f"dim={dim} must be divisible by heads={heads}")
        if attn_impl not in ("manual", "sdpa"):
            raise InputError(f"attn_impl must be 'manual' or 'sdpa', got {attn_impl!r}")
        self.heads, self.attn_impl, self.dropout = heads, attn_impl, dropout
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        hidden = int(ffn_dim or 4 * dim)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, *, need_logits: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` (B,T,D), ``bias`` (B,H,T,T) with the key padding already in it (-1e4 at padded keys).

        The logits are computed explicitly (one fused baddbmm) whenever the next layer or the caller needs
        them; ``attn_impl="sdpa"`` uses ``scaled_dot_product_attention`` where they are not needed.
        """
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b t (three h d) -> three b h t d", three=3, h=self.heads)
        p = self.dropout if self.training else 0.0
        logits = None
        bias = bias.to(q.dtype)
        if need_logits or self.attn_impl == "manual":
            b, h, t, _ = bias.shape
            flat = torch.baddbmm(bias.reshape(b * h, t, t), q.reshape(b * h, t, -1),
                                 k.reshape(b * h, t, -1).transpose(1, 2), alpha=q.shape[-1] ** -0.5)
            logits = flat.view(b, h, t, t)
            attn = F.dropout(torch.softmax(flat.float(), dim=-1).to(v.dtype), p, self.training)
            o = torch.bmm(attn, v.reshape(b * h, t, -1)).view(b, h, t, -1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        x = x + self.drop(self.out(rearrange(o, "b h t d -> b t (h d)")))
        x = x + self.drop(self.ffn(self.norm2(x)))
        return x, logits


class SE2Transformer(nn.Module):
    """SE(2)-invariant transformer over [CLS] + virtual cells + cells (see the module docstring)."""

    def __init__(self, *, dim: int, depth: int, heads: int, n_gaussians: int = 128, k_neighbors: int = 50,
                 far_distance: float = 200.0, dropout: float = 0.1, in_dim: int | None = None,
                 attn_impl: str = "sdpa", ffn_dim: int | None = None, arch: str = "project", **retired: Any):
        super().__init__()
        if arch != "project":
            raise InputError(f"SE2Transformer builds arch='project' (arch='original': stofm.original.se2), got {arch!r}")
        bad = sorted(k for k, v in retired.items() if RETIRED.get(k, object()) != v)
        if bad:
            raise InputError(f"SE2Transformer has no option {bad} (the switches towards the original SToFM are gone: "
                             "the original is arch 'original', e.g. stofm-original)")
        if k_neighbors < 1:
            raise InputError(f"k_neighbors must be >= 1, got {k_neighbors}")
        self.dim, self.heads, self.k_neighbors, self.far_distance = dim, heads, k_neighbors, float(far_distance)
        self.proj_in = nn.Linear(in_dim, dim) if in_dim and in_dim != dim else nn.Identity()
        self.cls_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        nn.init.normal_(self.mask_token, std=0.02)
        self.type_emb = nn.Embedding(N_TYPES, dim)
        self.dist_enc = GaussianDistanceEncoding(n_gaussians=n_gaussians, heads=heads, max_distance=far_distance)
        self.layers = nn.ModuleList(SE2Layer(dim=dim, heads=heads, dropout=dropout, attn_impl=attn_impl,
                                             ffn_dim=ffn_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def set_attn_impl(self, impl: str) -> None:
        """Switch every layer between the manual softmax path and ``scaled_dot_product_attention``."""
        for layer in self.layers:
            if impl not in ("manual", "sdpa"):
                raise InputError(f"attn_impl must be 'manual' or 'sdpa', got {impl!r}")
            layer.attn_impl = impl

    def forward(self, cell_emb: torch.Tensor, coords: torch.Tensor, pad_mask: torch.Tensor | None = None,
                virtual_emb: torch.Tensor | None = None, virtual_coords: torch.Tensor | None = None,
                virtual_pad_mask: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                return_pair: bool = True) -> dict:
        """Returns {"cls" (B,D), "cells" (B,N,D), "virtual" (B,V,D), "pair" (B,T,T,H), "cell_graph" (B,N,N)}.

        ``pad_mask``/``virtual_pad_mask`` are True at padding; ``mask`` (B,N) True replaces a cell's input by
        the learnable mask embedding (Masked Cell Modelling). T = 1 + V + N. ``return_pair=False`` skips the
        last layer's logits ("pair" is None), which lets ``attn_impl="sdpa"`` use the fused kernel there.
        """
        b, n, _ = cell_emb.shape
        dev = cell_emb.device
        pad, virtual_emb, virtual_coords, vpad = check_inputs(cell_emb, coords, pad_mask, virtual_emb, virtual_coords,
                                                              virtual_pad_mask)
        v = virtual_emb.shape[1]
        cells = self.proj_in(cell_emb)
        if mask is not None:
            cells = torch.where(mask.bool()[..., None], self.mask_token.to(cells.dtype), cells)
        x = torch.cat([self.cls_token.to(cells.dtype).expand(b, 1, -1), self.proj_in(virtual_emb), cells], 1)
        types = torch.tensor([CLS] + [VIRTUAL] * v + [CELL] * n, device=dev)
        x = x + self.type_emb(types).to(x.dtype)

        dist, etype, const, graph = self._distances(coords, pad, virtual_coords, vpad, types)
        gauss = self._bias(dist, etype, const)
        token_pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=dev), vpad, pad], 1)
        # padded keys: a large finite negative (not -inf), so the carried pair representation stays finite;
        # softmax gives them exactly 0 weight (exp(-1e4) underflows), as with -inf
        pad_bias = torch.zeros_like(gauss[:, :1]).masked_fill(token_pad[:, None, None, :], PAD_LOGIT)
        bias = gauss + pad_bias
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, logits = layer(x, bias, need_logits=return_pair or i < last)
            if logits is not None:
                bias = logits
        x = self.norm(x)
        return {"cls": x[:, 0], "virtual": x[:, 1:1 + v], "cells": x[:, 1 + v:],
                "pair": rearrange(bias, "b h i j -> b i j h") if return_pair else None, "cell_graph": graph}

    def _distances(self, coords: torch.Tensor, pad: torch.Tensor, vcoords: torch.Tensor, vpad: torch.Tensor,
                   types: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(dist (B,T,T), edge type (T,T), constant-entry mask (B,T,T), cell kNN graph (B,N,N))."""
        n = pad.shape[1]
        v = vcoords.shape[1]
        etype = types[:, None] * N_TYPES + types[None, :]
        xy = torch.cat([vcoords, coords], 1).float()
        xy = torch.where(torch.cat([vpad, pad], 1)[..., None], torch.zeros_like(xy), xy)
        d = (xy[:, :, None, :] - xy[:, None, :, :]).pow(2).sum(-1).sqrt()  # (B, V+N, V+N), exact in fp32
        dc = d[:, v:, v:].masked_fill(pad[:, None, :], float("inf"))
        kk = min(self.k_neighbors + 1, n)  # +1: a cell is its own nearest neighbour
        kth = dc.topk(kk, dim=-1, largest=False).values[..., -1:]
        graph = (dc <= kth * (1 + 1e-5) + 1e-6) & ~pad[:, None, :] & ~pad[:, :, None]
        graph = graph | graph.transpose(1, 2)
        cell_d = torch.where(graph, d[:, v:, v:], torch.full_like(dc, self.far_distance))
        d = torch.cat([d[:, :, :v], torch.cat([d[:, :v, v:], cell_d], 1)], 2)
        d = F.pad(d, (1, 0, 1, 0), value=0.0)  # [CLS] row/column: distance 0
        const = F.pad(~graph, (1 + v, 0, 1 + v, 0), value=False)  # far cell pairs share one bias
        return d, etype, const, graph

    def _bias(self, dist: torch.Tensor, etype: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """(B,H,T,T) bias; the far cell-cell entries (most of a large sub-slice) are encoded once."""
        b, t, _ = dist.shape
        far = self.dist_enc(dist.new_full((1,), self.far_distance), etype.new_full((1,), CELL * N_TYPES + CELL))
        out = far.expand(b, t, t, self.heads).clone()
        live = ~const
        et = etype.expand(b, t, t)
        out[live] = self.dist_enc(dist[live], et[live]).to(out.dtype)
        return rearrange(out, "b i j h -> b h i j").contiguous()


def check_inputs(cell_emb: torch.Tensor, coords: torch.Tensor, pad_mask: torch.Tensor | None,
                 virtual_emb: torch.Tensor | None, virtual_coords: torch.Tensor | None,
                 virtual_pad_mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """(pad (B, N), virtual_emb (B, V, C), virtual_coords (B, V, 2), virtual pad (B, V)) of an SE(2) call (both
    architectures): masks default to no padding, no virtual cells to empty ones; NaN/inf coordinates at non-padded
    positions and sub-slices that are all padding are errors."""
    b, n, c = cell_emb.shape
    dev = cell_emb.device
    pad = torch.zeros(b, n, dtype=torch.bool, device=dev) if pad_mask is None else pad_mask.bool()
    if virtual_emb is None:
        virtual_emb, virtual_coords = cell_emb.new_zeros(b, 0, c), coords.new_zeros(b, 0, 2)
    if virtual_coords is None:
        raise ValueError("virtual_emb given without virtual_coords")
    v = virtual_emb.shape[1]
    vpad = torch.zeros(b, v, dtype=torch.bool, device=dev) if virtual_pad_mask is None else virtual_pad_mask.bool()
    for xy, p, name in ((coords, pad, "coords"), (virtual_coords, vpad, "virtual_coords")):
        bad = ~torch.isfinite(xy).all(-1) & ~p
        if bad.any():
            raise ValueError(f"{name} contain NaN/inf values at {int(bad.sum())} non-padded positions")
    if (pad.all(1) & vpad.all(1)).any():
        raise ValueError("a sub-slice in the batch has no cells (all padding)")
    return pad, virtual_emb, virtual_coords, vpad
