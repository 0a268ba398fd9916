"""AdamW with no weight decay on norms, biases, embeddings and the logit scale; cosine schedule with warm-up."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from stofm.util.errors import InputError

if TYPE_CHECKING:
    import torch

NO_DECAY_NAMES = ("logit_scale", "logit_bias", "pos_embed", "cls_token", "reg_token", "mask_token", "type_embed")


def no_decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of parameters that get no weight decay: 0/1-d tensors (biases, norm scales, scalars), every
    parameter of a normalisation or embedding layer, the logit scale/bias, position/class tokens and whatever
    the model (or a timm backbone inside it) lists in ``no_weight_decay()``."""
    import torch

    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm, torch.nn.GroupNorm,
                  torch.nn.LocalResponseNorm, torch.nn.Embedding, torch.nn.EmbeddingBag)
    if hasattr(torch.nn, "RMSNorm"):
        norm_types = norm_types + (torch.nn.RMSNorm,)
    names: set[str] = set()
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, norm_types) or "norm" in type(module).__name__.lower():
            names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            try:
                names.update(prefix + n for n in listed())
            except TypeError:  # a method with another signature
                pass
    for name, param in model.named_parameters():
        if param.ndim <= 1 or any(token in name for token in NO_DECAY_NAMES):
            names.add(name)
    return names


def param_groups(model: torch.nn.Module, *, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters: decayed weights and the no-decay set."""
    skip = no_decay_parameter_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip else decay).append(param)
    if not decay and not no_decay:
        raise InputError("the model has no trainable parameters (everything is frozen)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`."""
    import torch

    return torch.optim.AdamW(param_groups(model, weight_decay=weight_decay), lr=lr, betas=tuple(betas), eps=eps)


def cosine_with_warmup(*, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warm-up to 1 over ``warmup_steps``, then a cosine down to
    ``min_lr_ratio`` at ``total_steps``."""
    if total_steps < 1:
        raise InputError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def cosine_weight_decay(start: float, end: float, step: int, total_steps: int) -> float:
    """Weight decay at ``step``: a cosine from ``start`` (step 0) to ``end`` (``total_steps``), no warm-up (DINO's
    ``cosine_scheduler`` of the weight decay, which ST-Align's pretraining uses: 0.04 -> 0.4)."""
    progress = min(1.0, max(0, step) / max(1, total_steps))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0, weight_decay_end: float | None = None
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over :func:`cosine_with_warmup`; step it once per optimizer step. ``weight_decay_end``: every group
    with weight decay also follows :func:`cosine_weight_decay` from its own value to this one (its state resumes
    with the optimizer's and the scheduler's)."""
    import torch

    fn = cosine_with_warmup(warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio)
    if weight_decay_end is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
    if not (math.isfinite(weight_decay_end) and weight_decay_end >= 0):
        raise InputError(f"weight_decay_end must be a number >= 0, got {weight_decay_end}")

    class CosineWeightDecayLR(torch.optim.lr_scheduler.LambdaLR):
        """The learning-rate schedule and, per step, the decayed groups' weight decay."""

        def step(self, epoch: int | None = None) -> None:
            super().step(epoch)
            for group in self.optimizer.param_groups:
                start = group.setdefault("initial_weight_decay", group["weight_decay"])
                if start > 0:
                    group["weight_decay"] = cosine_weight_decay(start, weight_decay_end, self.last_epoch,
                                                                total_steps)

    return CosineWeightDecayLR(optimizer, fn)
