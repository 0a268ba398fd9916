"""SToFM's pretraining objectives: Masked Cell Modelling (MCM) and Pairwise Distance Recovery (PDR).

MCM: 12% of the real cells of a sub-slice get their input replaced by the learnable mask embedding and 3% are
kept as they are; the model predicts the original cell embedding of those 15% (cosine loss). PDR: ~15% of the
cells are moved by Gaussian noise (σ = 5 × the sub-slice's mean nearest-neighbour spacing); a pair head
predicts, from the final pair representation, the original distances of the perturbed pairs (MSE, distances
in units of that spacing). The
pairs scored are those with a perturbed end that are neighbours in the model's (noisy) kNN graph: the model
sees a real distance only for them (all others share the far constant).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mcm_masks(pad_mask: torch.Tensor, *, mask_ratio: float = 0.12, keep_ratio: float = 0.03,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(replace (B,N), target (B,N)) bool: cells whose input is masked, and all cells scored (masked + kept).

    Every sub-slice with a real cell gets at least one target cell.
    """
    real = ~pad_mask.bool()
    u = torch.rand(pad_mask.shape, generator=generator, device="cpu").to(pad_mask.device)
    replace = real & (u < mask_ratio)
    target = real & (u < mask_ratio + keep_ratio)
    empty = ~target.any(1) & real.any(1)
    if empty.any():  # tiny sub-slices: mask the real cell with the smallest draw
        pick = torch.where(real, u, torch.full_like(u, 2.0)).argmin(1)
        forced = F.one_hot(pick, pad_mask.shape[1]).bool() & empty[:, None]
        replace, target = replace | forced, target | forced
    return replace, target


def mean_nn_spacing(coords: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """Mean nearest-neighbour distance of the real cells of each sub-slice (B,); 0 for single cells."""
    real = ~pad_mask.bool()
    d = torch.cdist(coords.float(), coords.float(), compute_mode="donot_use_mm_for_euclid_dist")
    invalid = ~(real[:, :, None] & real[:, None, :]) | torch.eye(coords.shape[1], dtype=torch.bool,
                                                                   device=coords.device)
    nn_d = d.masked_fill(invalid, float("inf")).min(-1).values
    ok = real & torch.isfinite(nn_d)
    return torch.where(ok, nn_d, torch.zeros_like(nn_d)).sum(1) / ok.sum(1).clamp_min(1)


def perturb_coords(coords: torch.Tensor, pad_mask: torch.Tensor, *, ratio: float = 0.15, sigma_factor: float = 5.0,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy coords (B,N,2), perturbed (B,N) bool): ``ratio`` of the real cells moved by N(0, σ²), σ = factor × spacing."""
    real = ~pad_mask.bool()
    sigma = sigma_factor * mean_nn_spacing(coords, pad_mask)
    u = torch.rand(pad_mask.shape, generator=generator, device="cpu").to(coords.device)
    noise = torch.randn(*coords.shape, generator=generator, device="cpu").to(coords.device, coords.dtype)
    perturbed = real & (u < ratio)
    noisy = coords + noise * sigma[:, None, None].to(coords.dtype) * perturbed[..., None]
    return noisy, perturbed


class PairDistanceHead(nn.Module):
    """Pair representation (B,N,N,H) -> symmetric distance prediction (B,N,N)."""

    def __init__(self, *, heads: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(heads, heads), nn.GELU(), nn.LayerNorm(heads), nn.Linear(heads, 1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        out = self.net(pair.float()).squeeze(-1)
        return (out + out.transpose(1, 2)) / 2


class MCMLoss(nn.Module):
    """Cosine loss 1 - cos(pred, target) averaged over the target cells."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, target_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        cos = F.cosine_similarity(pred.float(), target.float(), dim=-1)
        m = target_mask.float()
        return {"mcm_loss": ((1 - cos) * m).sum() / m.sum().clamp_min(1)}


class PDRLoss(nn.Module):
    """MSE between predicted and original distances over pairs with a perturbed end (neighbours, i ≠ j).

    Distances are in units of the sub-slice's mean nearest-neighbour spacing, so the term is O(1) whatever
    the cell density (raw scaled distances gave an MSE ~500x the cosine loss on the Visium crop).
    """

    def forward(self, pred: torch.Tensor, coords: torch.Tensor, perturbed: torch.Tensor, graph: torch.Tensor,
                pad_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        d = torch.cdist(coords.float(), coords.float(), compute_mode="donot_use_mm_for_euclid_dist")
        d = d / mean_nn_spacing(coords, pad_mask).clamp_min(1e-6)[:, None, None]
        real = ~pad_mask.bool()
        eye = torch.eye(coords.shape[1], dtype=torch.bool, device=coords.device)
        pairs = (perturbed[:, :, None] | perturbed[:, None, :]) & graph & real[:, :, None] & real[:, None, :] & ~eye
        m = pairs.float()
        return {"pdr_loss": ((pred.float() - d) ** 2 * m).sum() / m.sum().clamp_min(1)}


class SToFMPretrainLoss(nn.Module):
    """``{"mcm_loss", "pdr_loss", "loss"}`` with loss = mcm_weight·MCM + pdr_weight·PDR."""

    def __init__(self, *, mcm_weight: float = 1.0, pdr_weight: float = 1.0):
        super().__init__()
        self.mcm_weight, self.pdr_weight = mcm_weight, pdr_weight
        self.mcm, self.pdr = MCMLoss(), PDRLoss()

    def forward(self, out: dict, batch: dict) -> dict[str, torch.Tensor]:
        """``out`` from ``SToFM.pretrain_forward``; ``batch`` holds the originals (cell_emb, coords, pad_mask)."""
        res = self.mcm(out["cell_pred"], batch["cell_emb"], out["mcm_target"])
        res.update(self.pdr(out["dist_pred"], batch["coords"], out["perturbed"], out["cell_graph"], batch["pad_mask"]))
        res["loss"] = self.mcm_weight * res["mcm_loss"] + self.pdr_weight * res["pdr_loss"]
        return res
