"""Worker for tests/test_distributed_loss.py: run under ``torch.distributed.run`` (or ``accelerate launch``)
with 2 CPU processes (gloo). Each rank takes a slice of one global batch; the all-gathered loss (mean over
ranks) and the rank-averaged gradients are compared with one process computing the whole global batch.
Rank 0 writes the comparison as JSON to ``argv[1]``.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

import stalign
from stalign.training.losses import ThreeTargetLoss

G, M, B = 10, 4, 8


def global_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    mask = torch.rand(B, M, generator=g) > 0.3
    mask[:, 0] = True
    return {"spot_image": torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g),
            "niche_image": torch.randint(0, 256, (B, 3, 32, 32), dtype=torch.uint8, generator=g),
            "spot_expr": torch.rand(B, G, generator=g) * 3, "niche_expr": torch.rand(B, G, generator=g) * 3,
            "niche_spot_expr": torch.rand(B, M, G, generator=g) * 3,
            "niche_spot_coords": torch.rand(B, M, 2, generator=g) * 200, "niche_spot_mask": mask,
            "cluster": torch.tensor([0, 1, 0, 1, 2, 0, 2, 1]), "slide_idx": torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])}


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters() if p.requires_grad])


def run_case(kind: str, sizes: list[int], clusters: bool, rank: int, world: int) -> dict:
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", n_genes=G, siglip=(kind == "siglip")).eval()  # no dropout / BN drift
    batch = global_batch()
    start = sum(sizes[:rank])
    local = {k: v[start:start + sizes[rank]] for k, v in batch.items()}
    extra = {"cluster": local["cluster"], "slide_idx": local["slide_idx"]} if clusters else {}
    loss = ThreeTargetLoss(kind=kind, gather=True)(model(local), **extra)
    loss["loss"].backward()
    grads = flat_grads(model)
    dist.all_reduce(grads)
    grads /= world  # what DDP does
    terms = torch.stack([loss[k].detach() for k in ("spot_loss", "niche_loss", "fusion_loss", "loss")])
    dist.all_reduce(terms)
    terms /= world
    model.zero_grad()
    full_extra = {"cluster": batch["cluster"], "slide_idx": batch["slide_idx"]} if clusters else {}
    ref = ThreeTargetLoss(kind=kind, gather=False)(model(batch), **full_extra)
    ref["loss"].backward()
    ref_grads = flat_grads(model)
    ref_terms = torch.stack([ref[k].detach() for k in ("spot_loss", "niche_loss", "fusion_loss", "loss")])
    return {"kind": kind, "sizes": sizes, "clusters": clusters, "loss": terms.tolist(), "ref_loss": ref_terms.tolist(),
            "max_grad_diff": float((grads - ref_grads).abs().max()), "max_grad": float(ref_grads.abs().max()),
            "local_loss_differs": bool(abs(loss["loss"].item() - ref["loss"].item()) > 1e-4)}


def main() -> None:
    from accelerate import PartialState

    state = PartialState(cpu=True)  # the process group the training loop uses (gloo on CPU)
    rank, world = state.process_index, state.num_processes
    if world < 2 or dist.get_backend() != "gloo":
        raise SystemExit(f"expected >= 2 gloo processes, got world={world}")
    torch.set_num_threads(1)
    cases = [("infonce", [4, 4], False), ("infonce", [3, 5], True), ("siglip", [5, 3], False)]
    results = [run_case(kind, sizes, clusters, rank, world) for kind, sizes, clusters in cases]
    if rank == 0:
        with open(sys.argv[1], "w") as fh:
            json.dump({"world_size": world, "launcher_env": {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK")},
                       "results": results}, fh, indent=1)
    state.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
