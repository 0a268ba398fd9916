"""ABFN, the Attention-Based Fusion Network of ST-Align: bidirectional cross-attention between token sets.

Image tokens attend to gene tokens and gene tokens attend to image tokens (8 heads, LayerNorm on query
and on key/value, dropout 0.1), each followed by a feed-forward block; the two streams are concatenated
along the token axis, normalised, mean-pooled over valid tokens and projected into the shared space.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from stofm.util.errors import InputError


class CrossAttentionBlock(nn.Module):
    """``q + Attn(LN(q), LN(kv))`` then ``+ FFN(LN(.))``; ``kv_pad`` (B, Nk) True = padding (ignored)."""

    def __init__(self, *, dim: int, heads: int = 8, dropout: float = 0.1, ffn_mult: int = 4) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"token width {dim} is not divisible by {heads} heads")
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_mult * dim, dim), nn.Dropout(dropout))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None = None) -> torch.Tensor:
        kv_n = self.norm_kv(kv)
        attended, _ = self.attn(self.norm_q(q), kv_n, kv_n, key_padding_mask=kv_pad, need_weights=False)
        x = q + self.drop(attended)
        return x + self.ffn(self.norm_ffn(x))


class ABFN(nn.Module):
    """Fuse (B, Ni, D) image tokens and (B, Ng, D) gene tokens into one (B, out_dim) vector."""

    def __init__(self, *, dim: int, out_dim: int, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.image_to_gene = CrossAttentionBlock(dim=dim, heads=heads, dropout=dropout)
        self.gene_to_image = CrossAttentionBlock(dim=dim, heads=heads, dropout=dropout)
        self.norm = nn.LayerNorm(dim)
        self.head = ProjectionHead(in_dim=dim, out_dim=out_dim)

    def fuse_tokens(self, image: torch.Tensor, gene: torch.Tensor, image_pad: torch.Tensor | None = None,
                    gene_pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused (B, Ni + Ng, D) tokens and their (B, Ni + Ng) padding mask."""
        if image.shape[0] != gene.shape[0] or image.shape[-1] != gene.shape[-1]:
            raise ValueError(f"image tokens {tuple(image.shape)} and gene tokens {tuple(gene.shape)} must share B and D")
        img = self.image_to_gene(image, gene, gene_pad)   # image queries read the gene tokens
        gen = self.gene_to_image(gene, image, image_pad)  # gene queries read the image tokens
        fused = self.norm(torch.cat([img, gen], dim=1))
        b = image.shape[0]
        pads = [p if p is not None else torch.zeros(b, n, dtype=torch.bool, device=image.device)
                for p, n in ((image_pad, image.shape[1]), (gene_pad, gene.shape[1]))]
        return fused, torch.cat(pads, dim=1)

    def forward(self, image: torch.Tensor, gene: torch.Tensor, image_pad: torch.Tensor | None = None,
                gene_pad: torch.Tensor | None = None) -> torch.Tensor:
        fused, pad = self.fuse_tokens(image, gene, image_pad, gene_pad)
        return self.head(masked_mean(fused, pad))


def masked_mean(tokens: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Mean over the token axis of (B, N, D), skipping tokens where ``pad`` (B, N) is True."""
    if pad is None:
        return tokens.mean(dim=1)
    keep = rearrange((~pad).to(tokens.dtype), "b n -> b n 1")
    return (tokens * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear with a residual linear path (CLIP-style projection into the shared space)."""

    def __init__(self, *, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(out_dim, out_dim), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return self.norm(h + self.mlp(h))


class Tokenizer(nn.Module):
    """A (B, in_dim) feature vector -> K tokens (B, K, D) (ST-Align: 8 x 512)."""

    def __init__(self, *, in_dim: int, tokens: int, dim: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(in_dim, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(rearrange(self.proj(x), "b (k d) -> b k d", k=self.tokens))
