"""``STAlign``: spot/niche image encoders + gene encoders -> K tokens each -> ABFN fusion -> shared space.

Outputs of ``model(batch)`` (all L2-normalised (B, E)): ``spot_image_features``, ``spot_gene_features``,
``niche_image_features``, ``niche_gene_features``, ``fused_spot_features`` (ABFN of the spot pair),
``fused_niche_features`` (ABFN of the niche pair), plus ``logit_scale`` (1/temperature, clamped) and,
with ``siglip=True``, ``logit_bias``. Image-only inference uses the unimodal image embeddings, which the
spot/niche loss terms align with the gene embeddings of the same spot: ``encode_image`` is comparable
with ``encode_gene`` of a reference bank (the fused features need both modalities).

Two architectures share this class: ``fusion="project"`` (the default: linear tokenisers, residual ABFN, token-axis
concatenation, mean pooling, projection heads, learnable temperature) and ``fusion="paper"`` with
``tokenizer="conv1d"`` (ST-Align as published, ``stalign.models.paper_fusion``: Conv1d tokens, residual-free ABFN
with bottleneck FFNs, feature-axis concatenation, flatten heads K*D -> head_hidden -> ReLU -> E). A batch with a
``negatives`` sub-batch (B*M rows, row-major per spot) also yields the negatives' gene-side keys (``negative_*``).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from einops import rearrange
from torch import nn

from stalign.data.crop_spec import CropSpec
from stalign.models.abfn import ABFN, ProjectionHead, Tokenizer
from stalign.models.gene_encoders import build_cell_encoder, build_niche_encoder, l2
from stalign.models.gene_panel import GenePanelError, check_gene_panel
from stalign.models.image_encoders import create_image_encoder
from stalign.models.paper_fusion import ConvTokenizer, FlattenHead, PaperABFN, TransformerTokenizer
from stofm.util.config_io import ConfigError, check_field_types
from stofm.util.errors import InputError

GenePanelMismatchError = GenePanelError  # the model's name for the shared gene-panel error


@dataclass
class ImageConfig:
    """One image encoder: a registry spec and what trains (see ``create_image_encoder``)."""

    spec: str = "timm:resnet18"
    pretrained: bool | str | None = None
    arch: str | None = None
    freeze: bool = False
    unfreeze_last: int = 0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GeneConfig:
    """Gene side: ``encoder`` kind ("stofm", or a stofm cell-encoder kind: "mlp", "bert", ...) with
    ``encoder_kwargs``; ``niche`` ("se2" / "pool" / "mean_expr")."""

    encoder: str = "mlp"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    niche: str = "pool"
    niche_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class STAlignConfig:
    """Architecture of an ``STAlign`` (JSON files in ``stalign/model_configs`` map onto this)."""

    spot_image: ImageConfig = field(default_factory=ImageConfig)
    niche_image: ImageConfig = field(default_factory=ImageConfig)
    share_image_encoder: bool = False
    gene: GeneConfig = field(default_factory=GeneConfig)
    tokens: int = 8
    token_dim: int = 512
    heads: int = 8
    dropout: float = 0.1
    embed_dim: int = 512
    init_temperature: float = 0.1
    max_logit_scale: float = 100.0
    siglip: bool = False
    init_logit_bias: float = -10.0
    fusion: str = "project"  # "project" or "paper" (ST-Align's published ABFN + flatten heads)
    tokenizer: str = "linear"  # "linear" (Linear + LayerNorm) or "conv1d" (the paper's Conv1d tokens)
    tokenizer_widths: dict[str, int] = field(default_factory=dict)  # conv1d: a Linear to this width first, per side
    niche_gene_tokenizer: dict[str, Any] = field(default_factory=dict)  # {"kind": "transformer", ...}: paper's path
    head_hidden: int = 2048  # paper fusion: hidden width of the flatten heads
    learn_temperature: bool = True  # False: logit_scale is a fixed buffer (1 / init_temperature)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "STAlign config") -> STAlignConfig:
        """Build from a (JSON) dict; unknown keys and values of the wrong type (``dropout: "high"``) are an error
        naming them (``where``: the config's source)."""
        def checked(kind: type, values: Mapping[str, Any], what: str, types_where: str) -> dict[str, Any]:
            known = {f.name for f in fields(kind)}
            bad = sorted(set(values) - known - ({"name", "description"} if kind is cls else set()))
            if bad:
                raise InputError(f"{where}: unknown {what} config keys {bad}; known: {sorted(known)}")
            check_field_types(kind, values, where=types_where)
            return {k: v for k, v in values.items() if k in known}

        kw = checked(cls, d, "STAlign", where)
        for key, sub in {"spot_image": ImageConfig, "niche_image": ImageConfig, "gene": GeneConfig}.items():
            if key in kw and not isinstance(kw[key], Mapping):
                raise ConfigError(f"{where}: {key}={kw[key]!r} is not a mapping")
            if key in kw:
                kw[key] = sub(**checked(sub, kw[key], key, f"{where}, {key}"))
        return cls(**kw)

    def __post_init__(self) -> None:
        """One-line errors for settings that cannot be built."""
        if self.fusion not in FUSIONS:
            raise InputError(f"unknown fusion {self.fusion!r}; known: {', '.join(FUSIONS)}")
        if self.tokenizer not in TOKENIZERS:
            raise InputError(f"unknown tokenizer {self.tokenizer!r}; known: {', '.join(TOKENIZERS)}")
        bad = sorted(set(self.tokenizer_widths) - set(SIDES))
        if bad:
            raise InputError(f"tokenizer_widths: unknown sides {bad}; known: {', '.join(SIDES)}")
        if self.niche_gene_tokenizer.get("kind", "transformer") != "transformer":
            raise InputError(f"niche_gene_tokenizer kind {self.niche_gene_tokenizer['kind']!r}: only 'transformer'")
        small = [f"{k}={getattr(self, k)}" for k in ("tokens", "token_dim", "heads", "embed_dim", "head_hidden")
                 if getattr(self, k) < 1]
        if small:
            raise InputError(f"STAlign config: {', '.join(small)}: must be >= 1")
        if self.token_dim % self.heads:
            raise InputError(f"STAlign config: token_dim={self.token_dim} is not divisible by heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"STAlign config: dropout={self.dropout} must be in [0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FUSIONS = ("project", "paper")
TOKENIZERS = ("linear", "conv1d")
SIDES = ("spot_image", "niche_image", "spot_gene", "niche_gene")


def _image_encoder(cfg: ImageConfig) -> nn.Module:
    return create_image_encoder(cfg.spec, pretrained=cfg.pretrained, arch=cfg.arch, freeze=cfg.freeze,
                                unfreeze_last=cfg.unfreeze_last, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                **cfg.kwargs)


class STAlign(nn.Module):
    """The ST-Align model over a fixed gene panel (``genes``)."""

    def __init__(self, *, config: STAlignConfig, genes: Sequence[str]) -> None:
        super().__init__()
        if len(genes) == 0:
            raise InputError("the model needs a non-empty gene panel")
        self.config, self.genes = config, [str(g) for g in genes]
        c = config
        self.spot_image_encoder = _image_encoder(c.spot_image)
        self.niche_image_encoder = self.spot_image_encoder if c.share_image_encoder else _image_encoder(c.niche_image)
        cell, se2 = build_cell_encoder(c.gene.encoder, genes=self.genes, **c.gene.encoder_kwargs)
        self.spot_gene_encoder = cell
        self.niche_gene_encoder = build_niche_encoder(c.gene.niche, cell_encoder=cell, se2=se2, **c.gene.niche_kwargs)
        widths = {"spot_image": self.spot_image_encoder.out_dim, "niche_image": self.niche_image_encoder.out_dim,
                  "spot_gene": cell.out_dim, "niche_gene": self.niche_gene_encoder.out_dim}
        self.tokenizers = nn.ModuleDict({name: self._make_tokenizer(name, w) for name, w in widths.items()})
        k, d, e = c.tokens, c.token_dim, c.embed_dim
        if c.fusion == "paper":
            self.heads = nn.ModuleDict({n: FlattenHead(tokens=k, dim=d, hidden=c.head_hidden, out_dim=e) for n in SIDES})
            self.spot_fusion = PaperABFN(dim=d, heads=c.heads, dropout=c.dropout)
            self.niche_fusion = PaperABFN(dim=d, heads=c.heads, dropout=c.dropout)
            self.fusion_heads = nn.ModuleDict({n: FlattenHead(tokens=k, dim=d, hidden=c.head_hidden, out_dim=e)
                                               for n in ("spot", "niche")})
        else:
            self.heads = nn.ModuleDict({name: ProjectionHead(in_dim=d, out_dim=e) for name in SIDES})
            self.spot_fusion = ABFN(dim=d, out_dim=e, heads=c.heads, dropout=c.dropout)
            self.niche_fusion = ABFN(dim=d, out_dim=e, heads=c.heads, dropout=c.dropout)
        scale = torch.tensor(math.log(1.0 / c.init_temperature))
        if c.learn_temperature:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        if c.siglip:
            self.logit_bias = nn.Parameter(torch.tensor(float(c.init_logit_bias)))
        self.meta: dict[str, Any] = {}  # set by create_model: name, overrides (for checkpoints)
        self.crop_spec: CropSpec | None = None  # the crops of the shards it was trained on (set by training)

    def _make_tokenizer(self, name: str, in_dim: int) -> nn.Module:
        c = self.config
        if name == "niche_gene" and c.niche_gene_tokenizer:
            kwargs = {k: v for k, v in c.niche_gene_tokenizer.items() if k != "kind"}
            known = {"width", "depth", "heads", "dim_head", "mlp_dim", "hidden", "out_hidden"}
            if set(kwargs) - known:
                raise InputError(f"niche_gene_tokenizer: unknown keys {sorted(set(kwargs) - known)}; known: "
                                 f"kind, {', '.join(sorted(known))}")
            return TransformerTokenizer(in_dim=in_dim, tokens=c.tokens, dim=c.token_dim, dropout=c.dropout, **kwargs)
        if c.tokenizer == "conv1d":
            return ConvTokenizer(in_dim=in_dim, tokens=c.tokens, dim=c.token_dim, width=c.tokenizer_widths.get(name),
                                 what=f"{name} features")
        return Tokenizer(in_dim=in_dim, tokens=c.tokens, dim=c.token_dim)

    # ------------------------------------------------------------------------------------- checks
    @property
    def n_genes(self) -> int:
        return len(self.genes)

    def check_genes(self, genes: Sequence[str], *, source: str = "the data") -> None:
        """Raise ``GenePanelMismatchError`` unless ``genes`` is exactly the model's panel (same order)."""
        check_gene_panel(self.genes, genes, what=source, owner="the model",
                         hint="re-run prep with the model's gene list or train a new model")

    def _check_expr(self, expr: torch.Tensor, key: str) -> None:
        if expr.shape[-1] != self.n_genes:
            raise GenePanelMismatchError(f"batch[{key!r}] has {expr.shape[-1]} genes, the model's panel has "
                                         f"{self.n_genes}: shards from a different gene panel than the model")
        if expr.numel() and not bool(torch.isfinite(expr).all()):
            raise InputError(f"batch[{key!r}] contains NaN/inf expression values")

    # ------------------------------------------------------------------------------------- pieces
    def _embed(self, name: str, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.fusion == "paper":
            return l2(self.heads[name](tokens))  # flatten all K tokens
        return l2(self.heads[name](tokens.mean(dim=1)))

    def _fuse(self, which: str, image: torch.Tensor, gene: torch.Tensor) -> torch.Tensor:
        """L2-normalised fused (B, E) embedding of the spot or niche pair of token sets."""
        fusion = self.spot_fusion if which == "spot" else self.niche_fusion
        if self.config.fusion == "paper":
            return l2(self.fusion_heads[which](fusion(image, gene)))
        return l2(fusion(image, gene))

    def spot_image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokenizers["spot_image"](self.spot_image_encoder(x))

    def niche_image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokenizers["niche_image"](self.niche_image_encoder(x))

    def spot_gene_tokens(self, expr: torch.Tensor) -> torch.Tensor:
        self._check_expr(expr, "spot_expr")
        return self.tokenizers["spot_gene"](self.spot_gene_encoder(expr, input_kind="log1p"))

    def niche_gene_tokens(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        for key in ("niche_spot_expr", "niche_expr", "virtual_expr"):
            if key in batch:
                self._check_expr(batch[key], key)
        return self.tokenizers["niche_gene"](self.niche_gene_encoder(batch))

    # ------------------------------------------------------------------------------------- inference
    def encode_spot_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E) spot-image embedding in the gene space (uint8 or [0, 1] float crops)."""
        return self._embed("spot_image", self.spot_image_tokens(x))

    def encode_niche_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, E) niche-image embedding in the niche-gene space."""
        return self._embed("niche_image", self.niche_image_tokens(x))

    def encode_spot_gene(self, expr: torch.Tensor) -> torch.Tensor:
        """(B, E) spot-gene embedding of (B, G) log1p expression over the model's panel."""
        return self._embed("spot_gene", self.spot_gene_tokens(expr))

    def encode_niche_gene(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(B, E) niche-gene embedding (keys of the niche gene encoder, e.g. ``niche_spot_expr``)."""
        return self._embed("niche_gene", self.niche_gene_tokens(batch))

    @staticmethod
    def combine(spot: torch.Tensor, niche: torch.Tensor, niche_weight: float = 0.5) -> torch.Tensor:
        """L2-normalised ``(1 - w) * spot + w * niche``: one embedding per spot from its two scales."""
        if not 0.0 <= niche_weight <= 1.0:
            raise InputError(f"niche_weight must lie in [0, 1], got {niche_weight}")
        return l2((1.0 - niche_weight) * spot + niche_weight * niche)

    def encode_image(self, spot: torch.Tensor, niche: torch.Tensor, *, niche_weight: float = 0.5) -> torch.Tensor:
        """Image-only (B, E) embedding: spot and niche image embeddings combined (compare with ``encode_gene``)."""
        return self.combine(self.encode_spot_image(spot), self.encode_niche_image(niche), niche_weight)

    def encode_gene(self, batch: Mapping[str, torch.Tensor], *, niche_weight: float = 0.5) -> torch.Tensor:
        """Gene-side (B, E) embedding of ``batch`` (``spot_expr`` + niche keys), combined like ``encode_image``."""
        if "spot_expr" not in batch:
            raise KeyError("encode_gene needs batch['spot_expr'] (and the niche keys of the niche encoder)")
        return self.combine(self.encode_spot_gene(batch["spot_expr"]), self.encode_niche_gene(batch), niche_weight)

    # ------------------------------------------------------------------------------------- training
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in both image encoders (saves memory for large ViTs; same gradients)."""
        for enc in (self.spot_image_encoder, self.niche_image_encoder):
            enc.set_grad_checkpointing(enable)

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped to ``max_logit_scale`` (1/temperature)."""
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        need = ("spot_image", "niche_image", "spot_expr")
        missing = [k for k in need if k not in batch]
        if missing:
            raise KeyError(f"batch lacks {missing}; expected ShardDataset keys (see docs/ARCHITECTURE.md)")
        if batch["spot_image"].shape[0] == 0:
            raise ValueError("empty batch: no spots")
        si, ni = self.spot_image_tokens(batch["spot_image"]), self.niche_image_tokens(batch["niche_image"])
        sg, ng = self.spot_gene_tokens(batch["spot_expr"]), self.niche_gene_tokens(batch)
        out = {
            "spot_image_features": self._embed("spot_image", si),
            "spot_gene_features": self._embed("spot_gene", sg),
            "niche_image_features": self._embed("niche_image", ni),
            "niche_gene_features": self._embed("niche_gene", ng),
            "fused_spot_features": self._fuse("spot", si, sg),
            "fused_niche_features": self._fuse("niche", ni, ng),
            "logit_scale": self.scale(),
        }
        if self.config.siglip:
            out["logit_bias"] = self.logit_bias
        if "negatives" in batch:
            out |= self.encode_negatives(batch["negatives"], batch_size=si.shape[0])
        return out

    def encode_negatives(self, neg: Mapping[str, torch.Tensor], *, batch_size: int) -> dict[str, torch.Tensor]:
        """Gene-side keys of paired negatives (the published extra forward passes): ``neg`` holds B*M spots, the M
        negatives of each spot in a row; returns ``negative_<key>`` (B, M, E) for spot gene, niche gene and the
        fused niche (niche image + niche gene of the negative)."""
        n = neg["spot_expr"].shape[0]
        if n == 0 or n % batch_size:
            raise ValueError(f"{n} negative rows for {batch_size} spots: expected M > 0 negatives per spot")
        sg, ng = self.spot_gene_tokens(neg["spot_expr"]), self.niche_gene_tokens(neg)
        ni = self.niche_image_tokens(neg["niche_image"])
        feats = {"spot_gene_features": self._embed("spot_gene", sg), "niche_gene_features": self._embed("niche_gene", ng),
                 "fused_niche_features": self._fuse("niche", ni, ng)}
        return {f"negative_{k}": rearrange(v, "(b m) e -> b m e", b=batch_size) for k, v in feats.items()}
