"""ST-Align's fusion exactly as its published code builds it (``fusion: "paper"`` in an ``STAlignConfig``).

- :class:`ConvTokenizer`: a (B, F) feature vector -> K tokens of width D through ``Conv1d(1, K, kernel=s,
  stride=s)`` with s = F / D (the paper: kernel 1 on the 512-d ResNet / scGPT features, kernel 2 on UNI's 1024-d
  features), after an optional ``Linear(F, width)`` (the paper's ResNet-50 ends in a 2048 -> 512 fc).
- :class:`TransformerTokenizer`: the paper's niche-gene path: MLP -> K tokens of width W -> pre-norm transformer
  (residual, as published) -> per-token MLP W -> 256 -> D.
- :class:`PaperABFN`: two cross-attentions (LayerNorm on query and on key/value, no qkv bias, dropout on the
  attention map and after the output projection) with **no residual**, each followed by a bottleneck FFN
  D -> D/8 -> GELU -> D/2 with **no residual**; the two streams are concatenated on the **feature** axis (D/2 + D/2
  = D, all K tokens kept) and layer-normalised: (B, K, D).
- :class:`FlattenHead`: (B, K, D) -> flatten K*D -> hidden -> ReLU -> E (paper: 4096 -> 2048 -> 1024).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange
from torch import nn

from stofm.util.errors import InputError


class ConvTokenizer(nn.Module):
    """(B, in_dim) -> (B, tokens, dim): optional Linear to ``width``, then Conv1d(1, tokens, s, stride=s)."""

    def __init__(self, *, in_dim: int, tokens: int, dim: int, width: int | None = None, what: str = "features") -> None:
        super().__init__()
        width = int(width or in_dim)
        if width % dim:
            raise InputError(f"conv1d tokenizer: {what} are {width} wide, not a multiple of token_dim {dim}; set "
                             f"tokenizer_widths.{what.split()[0]} (a Linear to a multiple of {dim}) or use an encoder "
                             f"whose features are {dim} wide")
        self.proj = nn.Linear(in_dim, width) if width != in_dim else None
        stride = width // dim
        self.conv = nn.Conv1d(1, tokens, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x)
        return self.conv(x.unsqueeze(1))


class _SelfAttention(nn.Module):
    """Multi-head self-attention, no qkv bias, output projection with dropout (the paper's ``Attention``)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=False)
        self.drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = self.drop((q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1))
        return self.to_out(rearrange(attn @ v, "b h n d -> b n (h d)"))


class TransformerTokenizer(nn.Module):
    """The paper's niche-gene path: (B, in_dim) -> MLP (hidden..., ReLU) -> (B, tokens, width) -> ``depth``
    pre-norm transformer layers (residual) -> per-token Linear(width, 256) -> ReLU -> Linear(256, dim)."""

    def __init__(self, *, in_dim: int, tokens: int, dim: int, width: int = 548, depth: int = 6, heads: int = 8,
                 dim_head: int = 64, mlp_dim: int = 1024, hidden: Sequence[int] = (1024, 512), out_hidden: int = 256,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.tokens, widths = tokens, [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(widths[-1], tokens * width))
        self.layers = nn.ModuleList()
        for _ in range(depth):
            ff = nn.Sequential(nn.Linear(width, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, width),
                               nn.Dropout(dropout))
            self.layers.append(nn.ModuleList([nn.LayerNorm(width), _SelfAttention(width, heads, dim_head, dropout),
                                              nn.LayerNorm(width), ff]))
        self.out = nn.Sequential(nn.Linear(width, out_hidden), nn.ReLU(), nn.Linear(out_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rearrange(self.mlp(x), "b (k w) -> b k w", k=self.tokens)
        for norm_a, attn, norm_f, ff in self.layers:
            h = attn(norm_a(h)) + h
            h = ff(norm_f(h)) + h
        return self.out(h)


class PaperCrossAttention(nn.Module):
    """``to_out(softmax(q k^T / sqrt(d)) v)`` with q from LN(x), k, v from LN(y); no qkv bias, **no residual**."""

    def __init__(self, *, dim: int, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise InputError(f"token width {dim} is not divisible by {heads} heads")
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm_q, self.norm_kv = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.drop = nn.Dropout(dropout)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, y = self.norm_q(x), self.norm_kv(y)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(y), self.to_v(y)))
        attn = self.drop((q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1))
        return self.to_out(rearrange(attn @ v, "b h n d -> b n (h d)"))


def bottleneck_ffn(dim: int) -> nn.Sequential:
    """The paper's per-stream FFN: Linear(D, D/8) -> GELU -> Linear(D/8, D/2) (512 -> 64 -> 256), no residual."""
    if dim % 8:
        raise InputError(f"paper fusion needs a token width divisible by 8, got {dim}")
    return nn.Sequential(nn.Linear(dim, dim // 8), nn.GELU(), nn.Linear(dim // 8, dim // 2))


class PaperABFN(nn.Module):
    """(B, K, D) image tokens + (B, K, D) gene tokens -> (B, K, D) fused tokens (feature-axis concatenation)."""

    def __init__(self, *, dim: int, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.image_to_gene = PaperCrossAttention(dim=dim, heads=heads, dropout=dropout)
        self.gene_to_image = PaperCrossAttention(dim=dim, heads=heads, dropout=dropout)
        self.ffn_image, self.ffn_gene = bottleneck_ffn(dim), bottleneck_ffn(dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
        if image.shape != gene.shape:
            raise ValueError(f"paper fusion needs image and gene tokens of one shape, got {tuple(image.shape)} "
                             f"and {tuple(gene.shape)}")
        img = self.ffn_image(self.image_to_gene(image, gene))  # image queries read the gene tokens
        gen = self.ffn_gene(self.gene_to_image(gene, image))   # gene queries read the image tokens
        return self.norm(torch.cat([img, gen], dim=-1))


class FlattenHead(nn.Module):
    """(B, K, D) -> Linear(K*D, hidden) -> ReLU -> Linear(hidden, out_dim) (the paper's 4096 -> 2048 -> 1024)."""

    def __init__(self, *, tokens: int, dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(tokens * dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens.flatten(1))
