"""The original SToFM's pretraining batch (``SToFM_Collator(mask=True, mask_pair=True)``): Masked Cell Modelling
and Pairwise Distance Recovery targets drawn per sub-slice, in the original's order of random draws.

Per sub-slice with ``c`` cells (the cells come last in the node order): ``randperm(c)`` picks ``int(0.12 c)`` cells
whose input becomes -100 in every dimension and ``int(0.03 c)`` more kept unchanged, both labelled with their
embedding (MCM); a second ``randperm(c)`` picks the PDR cells the same way, ``randn`` noise times
``sigma = 5 sqrt(x_range * y_range / c)`` moves the masked ones, and their rows and columns of the distance matrix
become full Euclidean distances from the moved coordinates (no kNN, no far value; CLS row and column 0). PDR
targets are the clean distances at pairs of two cells touching a picked cell, off the diagonal, not 100.
"""
from __future__ import annotations

from typing import Any

import torch

from stofm.original.pipeline import FAR, SubSlice, collate

IGNORE = -100.0


def _pick(n_cells: int, rate: float, keep: float, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n_cells)
    n_mask, n_keep = int(n_cells * rate), int(n_cells * keep)
    return perm[:n_mask] + offset, perm[n_mask:n_mask + n_keep] + offset


def mask_batch(subs: list[SubSlice], *, rate: float = 0.12, keep: float = 0.03) -> dict[str, Any]:
    """A collated batch with MCM ``labels`` (B, n, D) and PDR ``pair_labels`` (B, n, n) (-100 where unlabelled),
    masked ``token_embeddings``, the PDR-modified ``attn_bias``, the clean ``spatial`` and the ``noised_spatial``
    coordinates and the draws (``picks``); it draws from
    torch's global generator (seed it for a reproducible batch)."""
    batch = collate(subs)
    feats, bias, types = batch["token_embeddings"], batch["attn_bias"], batch["token_types"]
    n = feats.shape[1]
    spatial = torch.zeros(len(subs), n, 2)
    labels = torch.full_like(feats, IGNORE)
    pair_labels = torch.full_like(bias, IGNORE)
    noised = torch.zeros_like(spatial)
    picks = []
    for b, sub in enumerate(subs):
        m = len(sub.indices)
        spatial[b, :m] = torch.from_numpy(sub.nodes).float()
        cells = torch.nonzero(types[b] == 0).flatten()
        n_cells, first = len(cells), int(cells[0]) if len(cells) else m
        mcm, mcm_kept = _pick(n_cells, rate, keep, first)
        pdr, pdr_kept = _pick(n_cells, rate, keep, first)
        noise = torch.randn(len(pdr), 2)
        lab = torch.cat([mcm, mcm_kept])
        labels[b, lab] = feats[b, lab]
        feats[b, mcm] = IGNORE
        xy = spatial[b, first:m]
        span = xy.max(0).values - xy.min(0).values if n_cells else torch.zeros(2)
        sigma = 5 * torch.sqrt(span[0] * span[1] / max(n_cells, 1))
        clean = bias[b].clone()
        touched = torch.zeros(n, dtype=torch.bool)
        touched[torch.cat([pdr, pdr_kept])] = True
        is_cell = types[b] == 0
        want = (touched[:, None] | touched[None, :]) & is_cell[:, None] & is_cell[None, :]
        want &= ~torch.eye(n, dtype=torch.bool) & (clean != FAR)
        pair_labels[b][want] = clean[want]
        moved = spatial[b].clone()
        moved[pdr] = moved[pdr] + noise * sigma
        full = torch.cdist(moved[:m], moved[:m])
        bias[b, pdr, :m] = full[pdr]
        bias[b, :m, pdr] = full[:, pdr]
        bias[b, 0, :] = 0
        bias[b, :, 0] = 0
        noised[b] = moved
        picks.append({"mcm_masked": mcm, "mcm_kept": mcm_kept, "pdr_masked": pdr, "pdr_kept": pdr_kept,
                      "pdr_noise": noise, "pdr_sigma": sigma})
    return {**batch, "token_embeddings": feats, "attn_bias": bias, "labels": labels, "pair_labels": pair_labels,
            "spatial": spatial, "noised_spatial": noised, "picks": picks}
