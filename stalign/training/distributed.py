"""All-gather with gradient across processes; a no-op when torch.distributed is not initialised.

Contrastive losses compare the local rows with the rows of every process. ``all_gather_with_grad``
concatenates the tensors of all ranks (sizes may differ along dim 0) and routes the gradient of each
slice back to the rank that produced it (an all-reduce of the stacked gradients, which works on gloo,
then each rank keeps its own slice). With per-rank losses averaged (DDP averages gradients), the
result equals the loss and gradient of one process holding the whole global batch.
"""
from __future__ import annotations

import torch


def is_distributed() -> bool:
    """True when a torch.distributed process group with more than one rank is active."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) when not distributed."""
    if not is_distributed():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def gather_sizes(n: int, device: torch.device) -> list[int]:
    """Rows held by each rank (``[n]`` when not distributed)."""
    if not is_distributed():
        return [n]
    import torch.distributed as dist

    local = torch.tensor([n], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        biggest = max(sizes)
        padded = x.new_zeros((biggest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` (rows along dim 0) from every rank, keeping the autograd graph; ``x`` alone if single-process."""
    if not is_distributed():
        return x
    sizes = sizes if sizes is not None else gather_sizes(x.shape[0], x.device)
    return _AllGather.apply(x, sizes)


def all_gather_no_grad(x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate ``x`` from every rank without gradient (labels, cluster ids)."""
    return all_gather_with_grad(x.detach(), sizes)
