"""The SE(2) transformer exactly as the original SToFM code computes it (``SToFMModel`` / ``SToFMForMaskedLM``), with
its state-dict key names, so released weights load unchanged.

Nodes are [CLS] + hypernodes (virtual cells) + cells; the input ``attn_bias`` is the distance matrix. Differences
from the project's own variant (``stofm.se2``), each as the original has it: post-LN layers; separate q/k/v
projections (k and v projected from the query tensor); configurable FFN width; a Gaussian distance module with one
``Linear(1, 1)`` affine, ReLU in its MLP and the bias forced to 0 wherever the distance is 0; that Gaussian bias
enters only the first layer and each layer's pre-softmax logits (-inf -> 0) are the next layer's bias; CLS is a zero
input of token type 1; no final LayerNorm.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NORM, CLS_TYPE, HYPER, PAD = 0, 1, 2, 3  # token types of the original


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
        cfg = cls(**out)
        if cfg.pre_layernorm:
            raise ValueError("pre_layernorm=True SToFM checkpoints are not supported (the released model is post-LN)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
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
        hidden, pairs, probs = [x], [], []
        for layer in self.encoder.layers:
            x, bias, p = layer(x, bias, pad)
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
        """MCM: L2-normalised ``lm_head`` outputs at the labelled rows (row-major), cosine-embedding loss; PDR:
        ``pair_head`` at labelled pairs, MSE against the clean distances."""
        out = self.model(token_embeddings, attn_bias, token_types)
        if labels is not None:
            rows = (labels != ignore).any(-1)
            logits = F.normalize(self.lm_head(out["last_hidden_state"][rows]), dim=-1)
            out["logits"] = logits
            out["loss"] = (1 - F.cosine_similarity(logits, labels[rows], dim=-1)).mean()
        if pair_labels is not None:
            mask = pair_labels != ignore
            out["pair_pred"] = self.pair_head(out["pair_rep"]).squeeze(-1)[mask]
            out["pair_loss"] = F.mse_loss(out["pair_pred"], pair_labels[mask])
        return out
