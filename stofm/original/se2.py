"""The SE(2) transformer exactly as the original SToFM code computes it (``SToFMModel`` / ``SToFMForMaskedLM``), with
its state-dict key names, so released weights load unchanged. This is the one implementation of the original SToFM:
``stofm-original`` models (``OriginalArchSE2``, fed from coordinates), ``stofm convert`` and the original pipeline
all build it; golden tests against the original code's outputs: ``tests/test_stofm_original.py``.

Nodes are [CLS] + hypernodes (virtual cells) + cells; the input ``attn_bias`` is the distance matrix. Differences
from the project's own variant (``stofm.se2``), each as the original has it: post-LN layers; separate q/k/v
projections; configurable FFN width; a Gaussian distance module with one ``Linear(1, 1)`` affine, ReLU in its MLP
and the bias forced to 0 wherever the distance is 0; that Gaussian bias enters only the first layer and each layer's
pre-softmax logits (-inf -> 0) are the next layer's bias; CLS is a zero input of token type 1 at the origin, part of
the kNN graph; no final LayerNorm; masked cells get -100 inputs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stofm.se2 import check_inputs
from stofm.util.config_io import check_field_types
from stofm.util.errors import InputError

NORM, CLS_TYPE, HYPER, PAD = 0, 1, 2, 3  # token types of the original
MCM_INPUT = -100.0  # the original's masked-cell input value (every dimension)


@dataclass
class OriginalSE2Config:
    """The ``SToFMConfig`` keys the forward uses (the released model: width 256, 32 heads, FFN 768, 12 layers)."""

    input_dim: int = 256
    hidden_size: int = 256
    num_hidden_layers: int = 12
    num_attention_heads: int = 32
    ffn_embedding_dim: int = 768
    gaussian_hidden_dim: int = 128
    activation_fn: str = "gelu"
    pre_layernorm: bool = False
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OriginalSE2Config:
        """From an original ``config.json`` (extra Hugging Face keys ignored; ``embedding_dim`` = ``hidden_size``)."""
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in values.items() if k in known}
        if "hidden_size" not in values and "embedding_dim" in values:
            out["hidden_size"] = values["embedding_dim"]
        check_field_types(cls, out, where="SToFM config")
        small = [f"{f.name}={out[f.name]}" for f in fields(cls) if f.type == "int" and out.get(f.name, 1) < 1]
        small += [f"{f.name}={out[f.name]}" for f in fields(cls)
                  if f.type == "float" and not 0 <= out.get(f.name, 0) < 1]
        if small:
            raise InputError(f"SToFM config: {', '.join(small)}: sizes must be >= 1, dropouts in [0, 1)")
        if out.get("activation_fn", "gelu") not in ("gelu", "relu"):
            raise InputError(f"SToFM config: activation_fn={out['activation_fn']!r}: the original uses gelu or relu")
        cfg = cls(**out)
        if cfg.pre_layernorm:
            raise InputError("pre_layernorm=True SToFM checkpoints are not supported (the released model is post-LN)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise InputError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GaussianModule(nn.Module):
    """Distance d -> ``y = w d + b`` -> K Gaussian densities -> Linear, ReLU, Linear -> one bias per head; 0 where
    d == 0 (CLS row and column, the diagonal, padding)."""

    def __init__(self, k: int, heads: int) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)
        self.means = nn.Embedding(1, k)
        self.stds = nn.Embedding(1, k)
        self.proj = nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Linear(k, heads))

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        """``dist`` (B, n, n) -> (B, heads, n, n)."""
        y = self.linear(dist.unsqueeze(-1).to(self.linear.weight.dtype))
        mean = self.means.weight.view(-1)
        std = self.stds.weight.view(-1).abs() + 1e-5
        phi = torch.exp(-0.5 * ((y - mean) / std) ** 2) / (math.sqrt(2 * math.pi) * std)
        bias = self.proj(phi).masked_fill((dist == 0).unsqueeze(-1), 0.0)
        return bias.permute(0, 3, 1, 2).contiguous()


class SelfAttention(nn.Module):
    """Multi-head attention with an additive bias; returns the output, the pre-softmax logits and the weights."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

        q = split(self.q_proj(x) * self.head_dim ** -0.5)
        k, v = split(self.k_proj(x)), split(self.v_proj(x))
        logits = q @ k.transpose(-1, -2) + bias
        logits = logits.masked_fill(pad[:, None, None, :], float("-inf"))
        pair = logits.masked_fill(torch.isinf(logits), 0.0)
        probs = F.dropout(torch.softmax(logits, dim=-1), self.dropout, self.training)
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return self.out_proj(out), pair, probs


class EncoderLayer(nn.Module):
    """Post-LN: x + attention -> LayerNorm -> x + fc2(act(fc1)) -> LayerNorm."""

    def __init__(self, cfg: OriginalSE2Config) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = SelfAttention(d, cfg.num_attention_heads, cfg.attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, cfg.ffn_embedding_dim), nn.Linear(cfg.ffn_embedding_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.act = {"gelu": F.gelu, "relu": F.relu}[cfg.activation_fn]
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout

    def forward(self, x: torch.Tensor, bias: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, pair, probs = self.self_attn(x, bias, pad)
        x = self.self_attn_layer_norm(x + F.dropout(h, self.dropout, self.training))
        h = self.fc2(F.dropout(self.act(self.fc1(x)), self.activation_dropout, self.training))
        x = self.final_layer_norm(x + F.dropout(h, self.dropout, self.training))
        return x, pair, probs


class _Encoder(nn.Module):
    def __init__(self, cfg: OriginalSE2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class OriginalSE2(nn.Module):
    """``SToFMModel``: node features (B, n, input_dim), distance matrix (B, n, n), token types (B, n) ->
    ``last_hidden_state`` (B, n, D), ``pair_rep`` (B, n, n, heads) and, on request, per-layer states."""

    def __init__(self, cfg: OriginalSE2Config) -> None:
        super().__init__()
        self.config = cfg
        self.embedding_layer = nn.Linear(cfg.input_dim, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(4, cfg.hidden_size)
        self.gaussian = GaussianModule(cfg.gaussian_hidden_dim, cfg.num_attention_heads)
        self.encoder = _Encoder(cfg)

    def forward(self, token_embeddings: torch.Tensor, attn_bias: torch.Tensor, token_types: torch.Tensor, *,
                details: bool = False) -> dict[str, torch.Tensor]:
        types = token_types.long()
        pad = types == PAD
        x = self.embedding_layer(token_embeddings) + self.token_type_embeddings(types)
        bias = gaussian = self.gaussian(attn_bias)
        hidden, pairs, probs = [x], [], []  # per layer; kept only for ``details`` (12 x (B, H, n, n) otherwise)
        for layer in self.encoder.layers:
            x, bias, p = layer(x, bias, pad)
            if details:
                hidden.append(x)
                pairs.append(bias)
                probs.append(p.mean(1))
        out = {"last_hidden_state": x, "pair_rep": bias.permute(0, 2, 3, 1), "cls_state": x[:, 0]}
        if details:
            out |= {"hidden_states": torch.stack(hidden), "gaussian_bias": gaussian, "layer_pair_reps": pairs,
                    "attentions": torch.stack(probs)}
        return out


class OriginalSE2ForMaskedLM(nn.Module):
    """``SToFMForMaskedLM``: the backbone (keys under ``model.``) + the MCM head (``lm_head``: Linear, ReLU, Linear)
    and the PDR head (``pair_head``: Linear, ReLU, Linear on the pair representation)."""

    def __init__(self, cfg: OriginalSE2Config) -> None:
        super().__init__()
        d, h = cfg.hidden_size, cfg.num_attention_heads
        self.model = OriginalSE2(cfg)
        self.lm_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.pair_head = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

    def forward(self, token_embeddings: torch.Tensor, attn_bias: torch.Tensor, token_types: torch.Tensor, *,
                labels: torch.Tensor | None = None, pair_labels: torch.Tensor | None = None,
                ignore: float = -100.0) -> dict[str, torch.Tensor]:
        """The backbone's outputs + ``mlm_heads``."""
        out = self.model(token_embeddings, attn_bias, token_types)
        return out | mlm_heads(out, self.lm_head, self.pair_head, labels, pair_labels, ignore=ignore)


def mlm_heads(out: dict[str, torch.Tensor], lm_head: nn.Module, pair_head: nn.Module,
              labels: torch.Tensor | None = None, pair_labels: torch.Tensor | None = None, *,
              ignore: float = -100.0) -> dict[str, torch.Tensor]:
    """``SToFMForMaskedLM``'s heads and losses on a backbone output: MCM: L2-normalised ``lm_head`` outputs at the
    labelled rows (row-major) -> ``logits``, ``loss`` = mean(1 - cos); PDR: ``pair_head`` at the labelled pairs ->
    ``pair_pred``, ``pair_loss`` = MSE against the clean distances. No labelled row/pair: a zero loss that still
    backpropagates."""
    zero = out["last_hidden_state"].sum() * 0
    res: dict[str, torch.Tensor] = {}
    if labels is not None:
        rows = (labels != ignore).any(-1)
        res["logits"] = F.normalize(lm_head(out["last_hidden_state"][rows]), dim=-1)
        res["loss"] = (1 - F.cosine_similarity(res["logits"], labels[rows], dim=-1)).mean() if rows.any() else zero
    if pair_labels is not None:
        pairs = pair_labels != ignore
        res["pair_pred"] = pair_head(out["pair_rep"]).squeeze(-1)[pairs]
        res["pair_loss"] = F.mse_loss(res["pair_pred"], pair_labels[pairs]) if pairs.any() else zero
    return res


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
    """``OriginalSE2`` (as ``self.model``) fed from coordinates, behind the interface of the project's
    ``SE2Transformer`` (cell embeddings + coordinates in, ``{"cls", "virtual", "cells", "pair", "cell_graph"}`` out):
    what a model config with ``"se2": {"arch": "original"}`` (``stofm-original``) builds. Coordinates must be in the
    original's frame (``geometry: "bbox"``: bounding-box diagonal 100, centred), since the CLS sits at the origin and
    takes part in the kNN graph (``original_distances``). The model-config keys map onto ``SToFMConfig``:
    dim -> hidden_size, depth -> num_hidden_layers, heads -> num_attention_heads, ffn_dim -> ffn_embedding_dim
    (default 3 x dim, the released 768 at 256), n_gaussians -> gaussian_hidden_dim, in_dim -> input_dim."""

    arch = "original"

    def __init__(self, *, dim: int, depth: int, heads: int, ffn_dim: int | None = None, n_gaussians: int = 128,
                 k_neighbors: int = 50, far_distance: float = 100.0, dropout: float = 0.1, in_dim: int | None = None,
                 activation: str = "gelu", arch: str = "original", attn_impl: str | None = None) -> None:
        super().__init__()
        if arch != "original":
            raise InputError(f"OriginalArchSE2 builds arch='original', got {arch!r}")
        if k_neighbors < 1:
            raise InputError(f"k_neighbors must be >= 1, got {k_neighbors}")
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
            raise InputError(f"attn_impl must be 'manual' or 'sdpa', got {impl!r}")

    def inputs(self, cell_emb: torch.Tensor, coords: torch.Tensor, pad_mask: torch.Tensor | None = None,
               virtual_emb: torch.Tensor | None = None, virtual_coords: torch.Tensor | None = None,
               virtual_pad_mask: torch.Tensor | None = None, *, mask: torch.Tensor | None = None
               ) -> dict[str, Any]:
        """The original's forward inputs: ``token_embeddings`` (B, T, C), ``attn_bias`` (the distance matrix),
        ``token_types`` (B, T), node coordinates ``nodes`` (B, T, 2); T = 1 + V + N."""
        b, n, c = cell_emb.shape
        dev = cell_emb.device
        pad, virtual_emb, virtual_coords, vpad = check_inputs(cell_emb, coords, pad_mask, virtual_emb, virtual_coords,
                                                              virtual_pad_mask)
        v = virtual_emb.shape[1]
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
