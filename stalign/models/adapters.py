"""What trains in a backbone: freeze, partial unfreeze (last n blocks), LoRA adapters on linear layers.

``LoRALinear`` wraps an ``nn.Linear``: ``y = W x + b + (alpha / r) * B A x`` with ``B`` zero at init, so
the wrapped layer equals the base layer until it trains; ``merge_lora`` folds ``B A`` into ``W``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from stofm.util.errors import InputError

LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "out_proj", "c_fc", "c_proj", "query", "key", "value", "dense")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, *, base: nn.Linear, rank: int, alpha: float = 16.0) -> None:
        super().__init__()
        if rank < 1:
            raise InputError(f"LoRA rank must be >= 1, got {rank}")
        self.base, self.rank, self.scaling = base, rank, alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.base.requires_grad_(False)

    @property
    def weight(self) -> torch.Tensor:  # modules that read .weight directly (e.g. fused attention) see the merged weight
        return self.base.weight + self.scaling * self.lora_b @ self.lora_a

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_a.t()) @ self.lora_b.t()

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the update folded in."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            out.weight.copy_(self.weight)
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out.to(self.base.weight.device, self.base.weight.dtype)


def apply_lora(module: nn.Module, *, rank: int, alpha: float = 16.0,
               targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """Freeze ``module`` and wrap every ``nn.Linear`` whose attribute name is in ``targets``; returns the count."""
    module.requires_grad_(False)
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name in targets:
                setattr(parent, name, LoRALinear(base=child, rank=rank, alpha=alpha))
                replaced += 1
    if replaced == 0:
        raise InputError(f"LoRA found no nn.Linear layer named one of {targets} in {type(module).__name__} "
                         "(convolutional backbones: use freeze / unfreeze_last instead)")
    return replaced


def merge_lora(module: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by its merged ``nn.Linear`` (in place); returns ``module``."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    return module


def block_list(module: nn.Module) -> nn.Module | None:
    """The main sequence of blocks: the longest ``blocks``/``resblocks``/``layers``/``stages`` container."""
    names = ("blocks", "resblocks", "layers", "stages", "layer")
    found = [m for n, m in module.named_modules() if n.split(".")[-1] in names
             and isinstance(m, (nn.Sequential, nn.ModuleList))]
    return max(found, key=len, default=None)


def unfreeze_last_blocks(module: nn.Module, n: int) -> None:
    """Freeze ``module`` except its last ``n`` blocks and every module after the block list (final norms, heads)."""
    blocks = block_list(module)
    if blocks is None:
        raise InputError(f"cannot find a block list in {type(module).__name__} for unfreeze_last={n}")
    module.requires_grad_(False)
    for blk in list(blocks)[-n:]:
        blk.requires_grad_(True)
    block_params = {id(p) for p in blocks.parameters()}
    order = [id(p) for p in module.parameters()]
    last_block_pos = max(i for i, pid in enumerate(order) if pid in block_params)
    for i, p in enumerate(module.parameters()):  # parameters registered after the blocks: final norm, pooler, ...
        if i > last_block_pos:
            p.requires_grad_(True)


def apply_trainability(module: nn.Module, *, freeze: bool = False, unfreeze_last: int = 0, lora_rank: int = 0,
                       lora_alpha: float = 16.0) -> None:
    """Apply the options in order: LoRA (base frozen), else partial unfreeze, else full freeze."""
    if lora_rank:
        apply_lora(module, rank=lora_rank, alpha=lora_alpha)
    elif unfreeze_last:
        unfreeze_last_blocks(module, unfreeze_last)
    elif freeze:
        module.requires_grad_(False)
