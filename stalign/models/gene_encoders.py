"""Gene encoders: spot expression -> features (a stofm cell encoder, e.g. the MLP over the panel, or a whole SToFM)
and niche expression -> features (the SToFM SE(2) transformer over the spots of the niche, with the slide's virtual
cells when the batch carries them; or a masked mean of the spot embeddings; or the niche mean expression).

Cell-encoder kinds are stofm's (``stofm.cell_encoder.CELL_ENCODERS``: "mlp", "bert", "geneformer", ...; a new kind
registers there with ``@stofm.cell_encoder.register_cell_encoder``), plus "stofm" (a whole SToFM: its cell encoder
and its SE(2)). Niche kinds register with ``@register_niche_encoder``. Inputs are log1p cp10k over the model's gene
panel (the shards' ``expression: log1p_cp10k``); every cell encoder is called with ``input_kind="log1p"``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from stalign.models.abfn import masked_mean
from stalign.models.gene_panel import GenePanelError
from stofm.util.errors import InputError

NICHE_ENCODERS: dict[str, Callable[..., NicheEncoder]] = {}
# stalign's defaults for stofm's kinds: its MLP features are not L2-normalised and 256 wide inside (what stalign
# checkpoints that name the kind without these keys were built with)
KIND_DEFAULTS: dict[str, dict[str, Any]] = {"mlp": {"hidden": 256, "normalize": False}}


def register_niche_encoder(name: str) -> Callable:
    """Decorator: ``fn(*, cell_encoder, se2, **cfg) -> NicheEncoder``."""

    def deco(fn: Callable) -> Callable:
        NICHE_ENCODERS[name] = fn
        return fn

    return deco


class StofmCell(nn.Module):
    """A whole SToFM's cell encoder; ``stofm_config`` rebuilds the SToFM architecture."""

    def __init__(self, *, encoder: nn.Module, stofm_config: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.encoder, self.out_dim, self.stofm_config = encoder, int(encoder.out_dim), stofm_config

    def forward(self, expr: torch.Tensor, *, input_kind: str = "log1p") -> torch.Tensor:
        return self.encoder(expr, input_kind=input_kind)


def _stofm(*, genes: Sequence[str], model: str = "stofm-tiny", stofm_config: Mapping[str, Any] | None = None,
           freeze: bool = False, **overrides: Any) -> tuple[nn.Module, nn.Module]:
    """A SToFM by config name (``stofm-tiny``, ``stofm-original``, ...), ``save_pretrained`` folder or ``stofm convert``
    folder of the released SToFM (its SE(2) weights; a fresh cell encoder from ``cell_encoder_cfg`` with the SE(2)'s
    input width), or from ``stofm_config`` (the architecture a stalign checkpoint records; weights then come from the
    checkpoint): cell encoder + SE(2). ``freeze``: neither trains (a pretrained SToFM used as a fixed encoder)."""

    import stofm

    if stofm_config is not None:
        from stofm.model import SToFM

        sm = SToFM.from_config(dict(stofm_config))
    else:
        sm = stofm.create_model(model, genes=list(genes), **overrides)
    if list(sm.genes) != list(genes):
        raise GenePanelError(f"stofm model {model!r} has a {len(sm.genes)}-gene panel that differs from the model's "
                             f"{len(genes)} genes")
    se2 = sm.se2
    if freeze:
        sm.requires_grad_(False)
    return StofmCell(encoder=sm.cell_encoder, stofm_config=sm.architecture()), se2


def build_cell_encoder(kind: str, *, genes: Sequence[str], **cfg: Any) -> tuple[nn.Module, nn.Module | None]:
    """(cell encoder, SE(2) transformer or None): "stofm", or a kind of stofm's registry over ``genes``."""
    from stofm.cell_encoder import CELL_ENCODERS, LAZY_KINDS
    from stofm.cell_encoder import build_cell_encoder as build_stofm_cell

    if kind == "stofm":
        return _stofm(genes=genes, **cfg)
    if kind not in CELL_ENCODERS and kind not in LAZY_KINDS:
        raise InputError(f"unknown gene encoder {kind!r}; known: stofm, {', '.join(sorted({*CELL_ENCODERS, *LAZY_KINDS}))}")
    return build_stofm_cell(kind, genes=list(genes), **{**KIND_DEFAULTS.get(kind, {}), **cfg}), None


class NicheEncoder(nn.Module):
    """Batch -> (B, out_dim) niche gene features."""

    out_dim: int

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def _need(batch: Mapping[str, torch.Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"the niche gene encoder needs batch keys {missing} (ShardDataset provides them)")


def _encode_spots(cell: nn.Module, expr: torch.Tensor) -> torch.Tensor:
    b = expr.shape[0]
    return rearrange(cell(rearrange(expr, "b m g -> (b m) g"), input_kind="log1p"), "(b m) d -> b m d", b=b)


class _CellNiche(NicheEncoder):
    """A niche encoder over the cell encoder's embeddings only (no SE(2): a given ``se2`` is not used)."""

    def __init__(self, *, cell_encoder: nn.Module, se2: nn.Module | None = None) -> None:
        super().__init__()
        self.cell, self.out_dim = cell_encoder, cell_encoder.out_dim


@register_niche_encoder("mean_expr")
class MeanExprNiche(_CellNiche):
    """The cell encoder on the niche's mean expression (ST-Align's niche gene input)."""

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        _need(batch, "niche_expr")
        return self.cell(batch["niche_expr"], input_kind="log1p")


@register_niche_encoder("pool")
class PoolNiche(_CellNiche):
    """Masked mean of the cell-encoder embeddings of the spots inside the niche."""

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        _need(batch, "niche_spot_expr", "niche_spot_mask")
        emb = _encode_spots(self.cell, batch["niche_spot_expr"])
        return masked_mean(emb, ~batch["niche_spot_mask"].bool())


class SE2Niche(NicheEncoder):
    """SToFM's SE(2) transformer over the niche's spots (+ virtual cells ``virtual_coords`` with ``virtual_expr``,
    encoded here, or ``virtual_emb``: given embeddings, the original SToFM's mean cell embeddings of its hypernodes,
    ``stalign.training.data.slide_virtual_cells``).

    Coordinates (µm) are centred on the niche's first spot and scaled to model units. ``coord_scale="slide"``
    (default) uses stofm's convention (``stofm.util.geometry``: the whole slide's diameter = 100 units; the batch's
    ``stofm_units_per_um`` from ``ShardDataset``), so a pretrained stofm sees the distances it was trained on; a
    number is a fixed scale in units per µm. The original SToFM architecture (``stofm-original``, a converted
    checkpoint) was trained in the slide's bounding-box frame (diagonal = 100 units, origin at the box centre, where
    its [CLS] node sits in the kNN graph): when the batch carries ``stofm_bbox_units_per_um`` and
    ``stofm_bbox_center_um`` (``stofm.util.geometry.bbox_units_per_um`` / ``bbox_center`` of the slide), that frame is
    used exactly; otherwise the slide-diameter scale (equal to the box diagonal for a rectangular capture area).
    Output: the [CLS] token.
    """

    def __init__(self, *, cell_encoder: nn.Module, se2: nn.Module, coord_scale: float | str = "slide") -> None:
        super().__init__()
        if coord_scale != "slide" and not (isinstance(coord_scale, (int, float)) and coord_scale > 0):
            raise InputError(f"coord_scale must be 'slide' or a positive number of units per µm, got {coord_scale!r}")
        self.cell, self.se2, self.coord_scale, self.out_dim = cell_encoder, se2, coord_scale, int(se2.dim)
        if getattr(se2, "mask_token", None) is not None:
            se2.mask_token.requires_grad_(False)  # Masked Cell Modelling only; unused when aligning

    def _frame(self, batch: Mapping[str, torch.Tensor], coords: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """(origin (B, 1, 2) in µm, model units per µm)."""
        if self.coord_scale != "slide":
            return coords[:, :1], float(self.coord_scale)
        if getattr(self.se2, "arch", "project") == "original" and "stofm_bbox_units_per_um" in batch:
            _need(batch, "stofm_bbox_center_um")
            return (batch["stofm_bbox_center_um"].to(coords).view(-1, 1, 2),
                    batch["stofm_bbox_units_per_um"].to(coords).view(-1, 1, 1))
        _need(batch, "stofm_units_per_um")
        return coords[:, :1], batch["stofm_units_per_um"].to(coords).view(-1, 1, 1)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        _need(batch, "niche_spot_expr", "niche_spot_coords", "niche_spot_mask")
        emb = _encode_spots(self.cell, batch["niche_spot_expr"])
        coords = batch["niche_spot_coords"].float()
        origin, scale = self._frame(batch, coords)
        coords = (coords - origin) * scale
        venb = vco = vpad = None
        if "virtual_emb" in batch or "virtual_expr" in batch:  # given embeddings: the original's hypernodes
            _need(batch, "virtual_coords")
            venb = batch["virtual_emb"].to(emb) if "virtual_emb" in batch else \
                _encode_spots(self.cell, batch["virtual_expr"])
            vco = (batch["virtual_coords"].float() - origin) * scale
            vpad = ~batch["virtual_mask"].bool() if "virtual_mask" in batch else None
        out = self.se2(emb, coords, ~batch["niche_spot_mask"].bool(), venb, vco, vpad)
        return out["cls"]


@register_niche_encoder("se2")
def _se2(*, cell_encoder: nn.Module, se2: nn.Module | None = None, coord_scale: float | str = "slide",
         **se2_cfg: Any) -> NicheEncoder:
    """The stofm SE(2) transformer (from the stofm model, or a fresh one from ``se2_cfg``: dim, depth, heads, ...)."""
    if se2 is None and se2_cfg.get("arch") == "original":  # the original SToFM SE(2), fresh
        from stofm.original.se2 import OriginalArchSE2

        se2 = OriginalArchSE2(in_dim=cell_encoder.out_dim, **{"dim": 64, "depth": 2, "heads": 4, **se2_cfg})
    elif se2 is None:
        from stofm.se2 import SE2Transformer

        se2 = SE2Transformer(in_dim=cell_encoder.out_dim, **{"dim": 64, "depth": 2, "heads": 4, **se2_cfg})
    return SE2Niche(cell_encoder=cell_encoder, se2=se2, coord_scale=coord_scale)


def build_niche_encoder(kind: str, *, cell_encoder: nn.Module, se2: nn.Module | None, **cfg: Any) -> NicheEncoder:
    """A registered niche gene encoder."""
    if kind not in NICHE_ENCODERS:
        raise InputError(f"unknown niche gene encoder {kind!r}; known: {', '.join(sorted(NICHE_ENCODERS))}")
    return NICHE_ENCODERS[kind](cell_encoder=cell_encoder, se2=se2, **cfg)


def l2(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last axis in float32."""
    return F.normalize(x.float(), dim=-1)
