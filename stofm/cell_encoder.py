"""Cell encoders: expression of one cell (or spot) over a gene panel -> 256-d L2-normalised embedding.

Two kinds share one call, ``forward(expr (B, G) over self.genes, *, input_kind) -> (B, out_dim)``:
``"bert"`` (SToFM/Geneformer: a pre-LN transformer over rank-value gene tokens, CLS -> Linear) and
``"mlp"`` (an MLP over log1p cp10k of a fixed panel, for small data). New kinds register with
``@register_cell_encoder(name)``; ``build_cell_encoder(kind, **cfg)`` makes one by name, and
``save_cell_encoder`` / ``load_cell_encoder`` write/read a folder of ``config.json`` + ``model.safetensors``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stofm.tokenize import TARGET_SUM, InputKind, check_input_kind, medians_for, rank_tokens
from stofm.util.errors import InputError
from stofm.vocab import GeneVocab

CELL_ENCODERS: dict[str, type[CellEncoder]] = {}
ENCODER_FORMAT = "stofm-cell-encoder"


def register_cell_encoder(name: str) -> Callable[[type], type]:
    """Class decorator: make a cell encoder buildable by ``name``."""
    def deco(cls: type) -> type:
        if name in CELL_ENCODERS and CELL_ENCODERS[name] is not cls:
            raise ValueError(f"cell encoder {name!r} is already registered ({CELL_ENCODERS[name].__name__})")
        CELL_ENCODERS[name] = cls
        cls.kind = name
        return cls
    return deco


# kinds registered by importing their module on first use (they need optional packages)
LAZY_KINDS = {"geneformer": "stofm.original.cell_bert"}


def build_cell_encoder(kind: str, **cfg) -> CellEncoder:
    """A registered cell encoder by name (``"bert"``, ``"mlp"``, ``"geneformer"``, ...) with its keyword config."""
    if kind not in CELL_ENCODERS and kind in LAZY_KINDS:
        import importlib

        importlib.import_module(LAZY_KINDS[kind])
    if kind not in CELL_ENCODERS:
        raise InputError(f"unknown cell encoder {kind!r}; registered: {', '.join(sorted(CELL_ENCODERS))}")
    return CELL_ENCODERS[kind](**cfg)


class CellEncoder(nn.Module):
    """Base: ``genes``, ``out_dim``, ``config`` (JSON-able constructor keywords) and ``encode_cells``."""

    kind = "base"
    genes: list[str]
    out_dim: int
    config: dict

    @torch.no_grad()
    def encode_cells(self, expr, genes: Sequence[str] | None = None, *, input_kind: InputKind = "counts",
                     batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Embeddings (N, out_dim) of any (N, G') matrix (dense/sparse/backed/tensor) over ``genes``.

        Runs in eval mode (no dropout) and restores the encoder's mode after. Columns are matched to
        ``self.genes`` by name (default: the input is over ``self.genes``); panel genes missing from the input
        count as 0 (with a warning). Rows are read ``4 × batch_size`` at a time
        and batched by number of expressed genes, so little padding is computed; output order is the input's.
        """
        import warnings

        import scipy.sparse as sp
        from tqdm.auto import tqdm

        genes = [str(g) for g in (self.genes if genes is None else genes)]
        if expr.shape[1] != len(genes):
            raise InputError(f"expression has {expr.shape[1]} columns but {len(genes)} genes were given")
        col = {g: i for i, g in enumerate(genes)}
        src = torch.tensor([col.get(g, -1) for g in self.genes])
        if (src < 0).all():
            raise InputError(f"none of the encoder's {len(self.genes)} genes is among the {len(genes)} given "
                             f"(e.g. encoder {self.genes[:3]}, input {genes[:3]})")
        if (src < 0).any():
            warnings.warn(f"{int((src < 0).sum())} of the encoder's {len(self.genes)} genes are absent from the "
                          "input and count as 0", UserWarning, stacklevel=2)
        device = next(self.parameters()).device
        out = torch.zeros(expr.shape[0], self.out_dim, device=device)
        chunk = 4 * batch_size
        was_training = self.training
        self.eval()  # embeddings without dropout, whatever mode the encoder was left in
        try:
            for start in tqdm(range(0, expr.shape[0], chunk), desc="encode cells", disable=not progress):
                block = expr[start:start + chunk]
                block = block.toarray() if sp.issparse(block) else block
                block = torch.as_tensor(np.asarray(block) if not torch.is_tensor(block) else block).float()
                aligned = block.new_zeros(block.shape[0], len(self.genes))
                aligned[:, src >= 0] = block[:, src[src >= 0]]
                order = torch.argsort((aligned > 0).sum(dim=1), stable=True)
                for s in range(0, len(order), batch_size):
                    rows = order[s:s + batch_size]
                    out[start + rows.to(device)] = self(aligned[rows].to(device), input_kind=input_kind).float()
        finally:
            self.train(was_training)
        return out


def check_expr(expr: torch.Tensor, n_genes: int) -> None:
    """Refuse an expression batch that is not (B, n_genes) of finite, non-negative values."""
    if expr.ndim != 2 or expr.shape[1] != n_genes:
        raise ValueError(f"expr must be (B, {n_genes}) over the encoder's genes, got {tuple(expr.shape)}")
    if not bool(torch.isfinite(expr).all()) or bool((expr < 0).any()):
        raise InputError("expr has NaN, infinite or negative values; pass counts or log1p-normalised values")


class PreLNBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)) (scaled_dot_product_attention), x + MLP(LN(x))."""

    def __init__(self, *, width: int, heads: int, dropout: float, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if width % heads:
            raise InputError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """``attend`` (B, 1, 1, L) bool, True where a key may be attended to."""
        q, k, v = rearrange(self.qkv(self.norm1(x)), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                           dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(rearrange(a, "b h l d -> b l (h d)")))
        return x + self.drop(self.mlp(self.norm2(x)))


@register_cell_encoder("bert")
class BertCellEncoder(CellEncoder):
    """SToFM's cell encoder: BERT over Geneformer rank-value tokens, CLS -> Linear -> L2-normalised.

    ``vocab`` defaults to one built from ``genes``; ``gene_medians`` ({gene: median} or an array over
    ``genes``) default to 1 (rank of normalised values) until ``set_medians``/``fit_medians``.
    Learned rank (position) embeddings as in Geneformer.
    """

    def __init__(self, *, genes: Sequence[str], vocab: GeneVocab | Sequence[str] | None = None,
                 gene_medians: Mapping[str, float] | Sequence[float] | None = None, width: int = 256,
                 depth: int = 4, heads: int = 4, max_len: int = 2048, out_dim: int = 256,
                 dropout: float = 0.02) -> None:
        super().__init__()
        self.genes = [str(g) for g in genes]
        if not isinstance(vocab, GeneVocab):
            vocab = GeneVocab.from_genes(self.genes if vocab is None else vocab)
        self.vocab, self.max_len, self.out_dim, self.width = vocab, int(max_len), int(out_dim), int(width)
        self.config = {"genes": self.genes, "vocab": vocab.genes, "width": width, "depth": depth, "heads": heads,
                       "max_len": self.max_len, "out_dim": self.out_dim, "dropout": dropout}
        ids = vocab.encode(self.genes, what="encoder genes")
        self.register_buffer("gene_ids", torch.from_numpy(np.where(ids == vocab.unk_id, -1, ids)))
        self.register_buffer("gene_medians", torch.ones(len(self.genes)))
        self.register_buffer("medians_fitted", torch.tensor(False))
        if gene_medians is not None:
            self.set_medians(gene_medians)
        self.token_embedding = nn.Embedding(len(vocab), width, padding_idx=vocab.pad_id)
        self.position_embedding = nn.Embedding(self.max_len + 1, width)
        self.embed_norm = nn.LayerNorm(width)
        self.embed_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(PreLNBlock(width=width, heads=heads, dropout=dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, self.out_dim)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
        if isinstance(m, nn.Embedding) and m.padding_idx is not None:
            nn.init.zeros_(m.weight[m.padding_idx])

    def set_medians(self, gene_medians: Mapping[str, float] | Sequence[float]) -> None:
        """Per-gene medians ({gene: median} or array over ``self.genes``); genes without one are left out."""
        import warnings

        med = medians_for(self.genes, gene_medians)
        ok = np.isfinite(med) & (med > 0)
        if not ok.any():
            raise InputError("no gene of the encoder has a positive median")
        if not ok.all():
            warnings.warn(f"{int((~ok).sum())} of the encoder's {len(ok)} genes have no median (never expressed "
                          f"where fitted?) and are left out of the tokens (e.g. "
                          f"{[self.genes[i] for i in np.flatnonzero(~ok)[:5]]})", UserWarning, stacklevel=2)
        self.gene_medians.copy_(torch.from_numpy(np.nan_to_num(med, nan=0.0)).float())
        self.medians_fitted.fill_(True)

    def fit_medians(self, X, genes: Sequence[str] | None = None, *, input_kind: InputKind = "counts") -> None:
        """Fit the medians on (cells, genes) expression (Geneformer's non-zero cp10k medians)."""
        from stofm.tokenize import fit_medians

        self.set_medians(fit_medians(X, list(self.genes if genes is None else genes), input=input_kind))

    def tokenizer(self):
        """A numpy/sparse ``RankValueTokenizer`` with this encoder's vocabulary and medians."""
        from stofm.tokenize import RankValueTokenizer

        med = self.gene_medians.cpu().numpy()
        return RankValueTokenizer(vocab=self.vocab, max_len=self.max_len,
                                  gene_medians={g: float(m) for g, m in zip(self.genes, med) if m > 0})

    def tokens(self, expr: torch.Tensor, *, input_kind: InputKind = "counts") -> tuple[torch.Tensor, torch.Tensor]:
        """Rank-value token ids and padding mask of ``expr`` (B, G) over ``self.genes``."""
        return rank_tokens(expr, self.gene_ids, self.gene_medians, self.max_len, input_kind=input_kind,
                           cls_id=self.vocab.cls_id, pad_id=self.vocab.pad_id)

    def forward_tokens(self, ids: torch.Tensor, pad_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"cls": (B, out_dim) L2-normalised, "hidden": (B, L, width)}`` of token ids (B, L)."""
        if ids.shape[1] > self.max_len + 1:
            raise ValueError(f"{ids.shape[1]} tokens exceed max_len + 1 = {self.max_len + 1}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.embed_drop(self.embed_norm(self.token_embedding(ids) + self.position_embedding(pos)[None]))
        attend = rearrange(~pad_mask, "b l -> b 1 1 l")
        for block in self.blocks:
            x = block(x, attend)
        hidden = self.final_norm(x)
        return {"cls": F.normalize(self.head(hidden[:, 0]).float(), dim=-1), "hidden": hidden}

    def forward(self, expr: torch.Tensor, *, input_kind: InputKind = "counts") -> torch.Tensor:
        """(B, out_dim) L2-normalised embeddings of ``expr`` (B, G) over ``self.genes``."""
        check_expr(expr, len(self.genes))
        ids, pad = self.tokens(expr, input_kind=input_kind)
        return self.forward_tokens(ids, pad)["cls"]


def log1p_cp10k(expr: torch.Tensor, input_kind: InputKind) -> torch.Tensor:
    """log1p(counts / total × 1e4) of counts; log1p input passes through."""
    check_input_kind(input_kind)
    if input_kind == "log1p":
        return expr.float()
    expr = expr.float()
    return torch.log1p(expr * TARGET_SUM / expr.sum(dim=1, keepdim=True).clamp_min(1e-12))


@register_cell_encoder("mlp")
class MLPCellEncoder(CellEncoder):
    """An MLP over log1p cp10k of a fixed gene panel: [Linear -> LayerNorm -> GELU -> Dropout] × depth -> Linear,
    L2-normalised (``normalize=False``: the raw Linear output, as stalign's gene side uses it)."""

    def __init__(self, *, genes: Sequence[str], hidden: int = 512, depth: int = 2, out_dim: int = 256,
                 dropout: float = 0.1, normalize: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise InputError(f"depth must be >= 1, got {depth}")
        self.genes, self.out_dim, self.normalize = [str(g) for g in genes], int(out_dim), bool(normalize)
        self.config = {"genes": self.genes, "hidden": hidden, "depth": depth, "out_dim": out_dim, "dropout": dropout,
                       "normalize": self.normalize}
        layers: list[nn.Module] = []
        width = len(self.genes)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Dropout(dropout)]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, self.out_dim)

    def forward(self, expr: torch.Tensor, *, input_kind: InputKind = "counts") -> torch.Tensor:
        """(B, out_dim) embeddings of ``expr`` (B, G) over ``self.genes``."""
        check_expr(expr, len(self.genes))
        out = self.head(self.body(log1p_cp10k(expr, input_kind)))
        return F.normalize(out.float(), dim=-1) if self.normalize else out


def write_weights_folder(path: str | os.PathLike, meta: dict, module: nn.Module) -> Path:
    """Write ``path/config.json`` (``meta``) and ``path/model.safetensors`` (``module``'s state dict)."""
    from safetensors.torch import save_file

    from stofm.util.safe_files import write_described_tensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_described_tensors(path / "config.json", path / "model.safetensors", lambda f: save_file(
        {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, str(f)), meta,
        key="weights_sha256", indent=1)
    return path


def read_weights_folder(path: str | os.PathLike, *, fmt: str, what: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a folder written by ``write_weights_folder`` whose config has ``format == fmt``
    (``stofm.util.safe_files.read_described_tensors``: safetensors only, sha256 checked). ``what`` names the kind of
    folder in error messages."""
    from stofm.util.safe_files import read_described_tensors

    return read_described_tensors(path, "config.json", "model.safetensors", fmt=fmt, what=what)


def save_cell_encoder(encoder: CellEncoder, path: str | os.PathLike) -> Path:
    """Write ``path/config.json`` (kind + constructor keywords) and ``path/model.safetensors``."""
    meta = {"format": ENCODER_FORMAT, "version": 1, "kind": encoder.kind, "config": encoder.config}
    return write_weights_folder(path, meta, encoder)


def load_cell_encoder(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> CellEncoder:
    """Rebuild a cell encoder saved by ``save_cell_encoder`` (safetensors: no pickle is executed)."""
    meta, tensors = read_weights_folder(path, fmt=ENCODER_FORMAT, what="cell encoder")
    encoder = build_cell_encoder(meta["kind"], **meta["config"])
    encoder.load_state_dict(tensors)
    return encoder.to(device)
