"""Three-target contrastive loss of ST-Align: spot image<->gene, niche image<->gene, fused spot<->fused niche.

``loss = alpha * spot_loss + beta * niche_loss + (1 - alpha - beta) * fusion_loss``. Each term is a
symmetric InfoNCE with in-batch negatives (or a SigLIP sigmoid loss) whose columns are all-gathered
across processes with gradient (``stalign.training.distributed``), so N processes with B rows each give the
loss and gradient of one process with N*B rows. Optional hard negatives: pairs of different spots
in the same cluster of the same slide are not negatives (masked out), so negatives come from other
clusters.

``PairedNegativeLoss`` is the objective of ST-Align's published code (``loss_kind: paper``): InfoNCE image->gene
only, fixed temperature 0.1, each spot against its own paired negatives (one spot of each other expression
cluster of its slide, ``stalign.training.paired_negatives``), no in-batch negatives.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from stalign.training.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    gather_sizes,
    rank_and_world,
)
from stofm.util.errors import InputError, NonFiniteLossError

TARGETS = {  # term -> (features a, features b)
    "spot_loss": ("spot_image_features", "spot_gene_features"),
    "niche_loss": ("niche_image_features", "niche_gene_features"),
    "fusion_loss": ("fused_spot_features", "fused_niche_features"),
}
LOSS_KINDS = ("infonce", "siglip")
PAPER_TEMPERATURE = 0.1
#: term -> (query, positive key, negative keys (B, M, E): ``negative_<positive key>``)
PAIRED_TARGETS = {name: (a, b, f"negative_{b}") for name, (a, b) in TARGETS.items()}


class EmptyBatchError(InputError):
    """A batch without rows reached the loss."""


def same_cluster_mask(cluster_rows: torch.Tensor, cluster_cols: torch.Tensor, slide_rows: torch.Tensor | None,
                      slide_cols: torch.Tensor | None) -> torch.Tensor:
    """(R, C) True where row and column spot share cluster (and slide when given): not usable as negatives."""
    mask = cluster_rows[:, None] == cluster_cols[None, :]
    if slide_rows is not None and slide_cols is not None:
        mask &= slide_rows[:, None] == slide_cols[None, :]
    return mask


def _infonce_rows(a: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor, offset: int,
                  exclude: torch.Tensor | None) -> torch.Tensor:
    """Sum over the local rows of cross-entropy(a_i . b_all / T, positive = offset + i); ``exclude`` (R, C): True
    where a column is no negative of a row (never its positive)."""
    logits = scale * a @ b_all.t()
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    return F.cross_entropy(logits, torch.arange(a.shape[0], device=a.device) + offset, reduction="sum")


def _siglip_rows(a: torch.Tensor, b_all: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int,
                 exclude: torch.Tensor | None) -> torch.Tensor:
    """Sum over local rows and all columns of -log sigmoid(z_ij (scale a_i.b_j + bias)), z = +1 on positives."""
    logits = scale * a @ b_all.t() + bias
    sign = -torch.ones_like(logits)
    rows = torch.arange(a.shape[0], device=a.device)
    sign[rows, rows + offset] = 1.0
    terms = -F.logsigmoid(sign * logits)
    return (terms if exclude is None else terms.masked_fill(exclude, 0.0)).sum()


class ThreeTargetLoss(nn.Module):
    """Weighted three-target contrastive loss; ``forward(out, cluster=None, slide_idx=None) -> dict of losses``.

    ``out`` is the model's output dict (L2-normalised (B, E) features, ``logit_scale`` = 1/temperature and,
    for SigLIP, ``logit_bias``). ``cluster``/``slide_idx`` (B,) enable the hard-negative mask.
    """

    def __init__(self, *, alpha: float = 0.3, beta: float = 0.3, kind: str = "infonce", gather: bool = True,
                 check_finite: bool = True) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise InputError(f"unknown loss kind {kind!r}; known: {', '.join(LOSS_KINDS)}")
        if not (0.0 <= alpha and 0.0 <= beta and alpha + beta <= 1.0):
            raise InputError(f"need alpha, beta >= 0 and alpha + beta <= 1, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.kind, self.gather, self.check_finite = alpha, beta, kind, gather, check_finite
        self.weights = {"spot_loss": alpha, "niche_loss": beta, "fusion_loss": 1.0 - alpha - beta}

    def pair_loss(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, *, bias: torch.Tensor | None = None,
                  cluster: torch.Tensor | None = None, slide_idx: torch.Tensor | None = None,
                  sizes: list[int] | None = None) -> torch.Tensor:
        """Symmetric loss of one pair of (B, E) feature sets; equals the single-process loss on the global batch.

        ``sizes``: rows per rank (``gather_sizes``), computed here when not given."""
        n_local = a.shape[0]
        if self.gather:
            sizes = sizes if sizes is not None else gather_sizes(n_local, a.device)
            rank, _ = rank_and_world()
            a_all, b_all = all_gather_with_grad(a, sizes), all_gather_with_grad(b, sizes)
            offset, n_global = sum(sizes[:rank]), sum(sizes)
        else:
            a_all, b_all, offset, n_global = a, b, 0, n_local
        exclude = None
        if cluster is not None:
            c_all = all_gather_no_grad(cluster, sizes) if self.gather else cluster
            s_all = None
            if slide_idx is not None:
                s_all = all_gather_no_grad(slide_idx, sizes) if self.gather else slide_idx
            exclude = same_cluster_mask(cluster, c_all, slide_idx, s_all)
            rows = torch.arange(n_local, device=exclude.device)
            exclude[rows, rows + offset] = False  # never mask the positive
        # Per-rank losses get averaged by the caller (DDP / all-reduce mean); dividing by the rows per rank on
        # average (n_global / world) makes that mean the loss of one process holding the global batch.
        per_rank = n_global / rank_and_world()[1] if self.gather else n_local
        if self.kind == "infonce":
            total = _infonce_rows(a, b_all, scale, offset, exclude) + _infonce_rows(b, a_all, scale, offset, exclude)
            return total / (2 * per_rank)
        if bias is None:
            raise InputError("the SigLIP loss needs out['logit_bias']: build the model with siglip=True")
        return _siglip_rows(a, b_all, scale, bias, offset, exclude) / per_rank

    def forward(self, out: Mapping[str, torch.Tensor], *, cluster: torch.Tensor | None = None,
                slide_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        missing = [k for pair in TARGETS.values() for k in pair if k not in out]
        if missing or "logit_scale" not in out:
            raise KeyError(f"model output lacks {missing + ([] if 'logit_scale' in out else ['logit_scale'])}")
        n = out["spot_image_features"].shape[0]
        if n == 0:
            raise EmptyBatchError("empty batch: the contrastive loss needs at least one spot per process")
        scale, bias = out["logit_scale"], out.get("logit_bias")
        sizes = gather_sizes(n, out["spot_image_features"].device) if self.gather else None
        result: dict[str, torch.Tensor] = {}
        for name, (ka, kb) in TARGETS.items():
            a, b = out[ka], out[kb]
            if a.shape != b.shape or a.shape[0] != n:
                raise ValueError(f"{ka} {tuple(a.shape)} and {kb} {tuple(b.shape)} must both be ({n}, E)")
            result[name] = self.pair_loss(a, b, scale, bias=bias, cluster=cluster, slide_idx=slide_idx, sizes=sizes)
        result["loss"] = sum(self.weights[k] * result[k] for k in TARGETS)
        if self.check_finite and not bool(torch.isfinite(result["loss"]).item()):
            bad = [k for k in TARGETS if not bool(torch.isfinite(result[k]).item())]
            inputs = [k for pair in TARGETS.values() for k in pair if not bool(torch.isfinite(out[k]).all().item())]
            raise NonFiniteLossError(f"non-finite contrastive loss in {bad}; non-finite model outputs: {inputs or 'none'}"
                                     f"; logit_scale={float(scale):.4g}")
        return result


def paired_infonce(query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, *,
                   temperature: float = PAPER_TEMPERATURE) -> torch.Tensor:
    """Mean over rows i of cross-entropy([q_i.p_i, q_i.n_i1, ..., q_i.n_iM] / T, class 0) on L2-normalised
    vectors: (B, E) queries, (B, E) positives, (B, M, E) negatives of each row (InfoNCE, ``negative_mode='paired'``)."""
    if query.ndim != 2 or positive.shape != query.shape or negatives.ndim != 3 or negatives.shape[0] != query.shape[0]:
        raise ValueError(f"paired InfoNCE needs (B, E) query and positive and (B, M, E) negatives, got "
                         f"{tuple(query.shape)}, {tuple(positive.shape)}, {tuple(negatives.shape)}")
    q, p, n = (F.normalize(x.float(), dim=-1) for x in (query, positive, negatives))
    logits = torch.cat([(q * p).sum(-1, keepdim=True), torch.einsum("be,bme->bm", q, n)], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


class PairedNegativeLoss(nn.Module):
    """ST-Align's published objective: ``alpha * spot + beta * niche + (1 - alpha - beta) * fusion``, each a paired
    InfoNCE in one direction (image -> gene; fused spot -> fused niche) at a fixed temperature (not learned, the
    model's ``logit_scale`` is ignored). ``out`` needs the ``negative_*`` keys (``STAlign.encode_negatives``).

    Rows are independent (no in-batch negatives), so the per-process mean that DDP averages is the mean over
    the global batch: nothing is gathered."""

    def __init__(self, *, alpha: float = 0.3, beta: float = 0.3, temperature: float = PAPER_TEMPERATURE,
                 check_finite: bool = True) -> None:
        super().__init__()
        if not (0.0 <= alpha and 0.0 <= beta and alpha + beta <= 1.0):
            raise InputError(f"need alpha, beta >= 0 and alpha + beta <= 1, got alpha={alpha}, beta={beta}")
        if temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        self.alpha, self.beta, self.temperature, self.check_finite = alpha, beta, float(temperature), check_finite
        self.weights = {"spot_loss": alpha, "niche_loss": beta, "fusion_loss": 1.0 - alpha - beta}

    def forward(self, out: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for keys in PAIRED_TARGETS.values() for k in keys if k not in out]
        if missing:
            raise KeyError(f"model output lacks {missing}: the paper loss needs batches with paired negatives "
                           f"(batch['negatives'], loss_kind=paper)")
        if out["spot_image_features"].shape[0] == 0:
            raise EmptyBatchError("empty batch: the contrastive loss needs at least one spot per process")
        result = {name: paired_infonce(out[q], out[p], out[n], temperature=self.temperature)
                  for name, (q, p, n) in PAIRED_TARGETS.items()}
        result["loss"] = sum(self.weights[k] * result[k] for k in PAIRED_TARGETS)
        if self.check_finite and not bool(torch.isfinite(result["loss"]).item()):
            bad = [k for k in PAIRED_TARGETS if not bool(torch.isfinite(result[k]).item())]
            raise NonFiniteLossError(f"non-finite paired contrastive loss in {bad}")
        return result
