"""The original SToFM's pretraining objective for a ``stofm-original`` model (``SToFM`` with ``arch: original``):
batches from ``stofm.original.masking.mask_batch`` (the original collator: 12% of the cells masked with -100 inputs +
3% kept; PDR: as many cells moved by noise of sigma = 5 sqrt(area / cells), their distance rows full distances,
targets the clean kNN distances in model units), losses as ``SToFMForMaskedLM``: MCM = mean(1 - cos) of the
L2-normalised ``lm_head`` at the labelled cells, PDR = MSE of ``pair_head`` at the labelled pairs."""
from __future__ import annotations

from typing import Any

import torch

from stofm.original.masking import IGNORE, mask_batch
from stofm.original.pipeline import SubSlice, build_subslices
from stofm.original.se2 import mlm_heads
from stofm.util.errors import InputError


def tile_subslices(slide: Any) -> list[SubSlice]:
    """The original's sub-slices of a prepared slide (``stofm.embedding.Slide`` in the original frame): per tile,
    nodes [CLS (0, 0)] + the slide's virtual cells + the tile's cells, the original distance matrix."""
    return build_subslices(slide.coords.double().cpu().numpy(), slide.cell_emb.float().cpu().numpy(),
                           slide.virtual_coords.double().cpu().numpy(), slide.virtual_emb.float().cpu().numpy(),
                           tiles=slide.tiles)


def masked_batch(subs: list[SubSlice], *, seed: int, rate: float = 0.12, keep: float = 0.03) -> dict[str, Any]:
    """``mask_batch`` with torch's global generator seeded by ``seed`` inside a forked RNG state (the draws are a
    function of ``seed`` and leave the caller's RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mask_batch(subs, rate=rate, keep=keep)


def mlm_outputs(model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``SToFMForMaskedLM.forward`` with the model's SE(2) (``model.se2.model``), ``cell_head`` (``lm_head``) and
    ``dist_head`` (``pair_head``): ``logits``, ``loss`` (MCM), ``pair_pred``, ``pair_loss`` (PDR); ``mlm_heads``."""
    if getattr(model, "arch", "project") != "original":
        raise InputError("the original objective needs a stofm-original model (se2 arch 'original')")
    dev = next(model.parameters()).device
    out = model.se2.model(batch["token_embeddings"].to(dev), batch["attn_bias"].to(dev),
                          batch["token_types"].to(dev))
    return mlm_heads(out, model.cell_head, model.dist_head, batch["labels"].to(dev), batch["pair_labels"].to(dev),
                     ignore=IGNORE)


class OriginalPretrainLoss(torch.nn.Module):
    """``{"mcm_loss", "pdr_loss", "loss"}`` with loss = mcm_weight MCM + pdr_weight PDR (the original adds both)."""

    def __init__(self, *, mcm_weight: float = 1.0, pdr_weight: float = 1.0) -> None:
        super().__init__()
        self.mcm_weight, self.pdr_weight = mcm_weight, pdr_weight

    def forward(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = mlm_outputs(model, batch)
        return {"mcm_loss": out["loss"], "pdr_loss": out["pair_loss"],
                "loss": self.mcm_weight * out["loss"] + self.pdr_weight * out["pair_loss"]}
