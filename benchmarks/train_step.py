"""Training-step throughput (pairs/s) and model FLOP utilisation of stalign models: fp32 vs bf16, eager vs compile.

    python benchmarks/train_step.py --device cuda            # stalign-base and small, batch 64, + largest batch (OOM search)
    python benchmarks/train_step.py --device cpu --models stalign-tiny small --batch 4
    python benchmarks/train_step.py --quick                  # stalign-tiny, batch 4 (seconds)

One step = forward of the four inputs (spot/niche crops, spot expression, niche spots with coordinates),
``ThreeTargetLoss``, backward, AdamW step, on synthetic data of the ``ShardDataset`` batch layout (uint8
crops at the model's input size, 200 genes, 16 niche spots). FLOPs of forward + backward are counted once
with ``torch.utils.flop_counter.FlopCounterMode``; utilisation = FLOP/s achieved over the dense bf16 matmul
rate measured in the same run (fp32 rate noted). Models: ``stalign-base`` (ViT-B/16 spot + niche at 224 px,
SToFM-small + SE(2) niche encoder, ABFN), ``small`` (the same with ViT-S/16 and stofm-tiny), ``stalign-tiny``.
On CUDA the largest batch that fits (bf16, eager) is found by doubling then bisecting on out-of-memory.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    load_average,
    matmul_peak,
    median_seconds,
    parser,
    record,
    setup,
    table,
)

GENES = [f"GENE{i}" for i in range(200)]
MODELS = {
    "stalign-base": ("stalign-base", {}),
    "small": ("stalign-base", {"image": {"spec": "timm:vit_small_patch16_224"},
                               "gene": {"encoder_kwargs": {"model": "stofm-tiny"}}}),
    "stalign-tiny": ("stalign-tiny", {}),
}


def make_batch(model, batch: int, device, *, niche_spots: int = 16, seed: int = 0) -> dict:
    """A ``ShardDataset``-layout batch of random crops and log1p-like expression."""
    import torch

    g = torch.Generator().manual_seed(seed)
    p, n = model.spot_image_encoder.input_size, len(GENES)
    expr = torch.log1p(torch.poisson(torch.full((batch, niche_spots, n), 0.5), generator=g))
    mask = torch.rand(batch, niche_spots, generator=g) < 0.8
    mask[:, 0] = True
    out = {"spot_image": torch.randint(0, 256, (batch, 3, p, p), dtype=torch.uint8, generator=g),
           "niche_image": torch.randint(0, 256, (batch, 3, p, p), dtype=torch.uint8, generator=g),
           "spot_expr": expr[:, 0].contiguous(), "niche_spot_expr": expr, "niche_expr": expr.mean(1),
           "niche_spot_coords": torch.randn(batch, niche_spots, 2, generator=g) * 60, "niche_spot_mask": mask}
    return {k: v.to(device) for k, v in out.items()}


class Trainer:
    """One model + AdamW + ThreeTargetLoss; ``step(batch)`` runs a full training step."""

    def __init__(self, *, name: str, device, precision: str, compile: bool) -> None:
        import torch

        import stalign
        from stalign.models.perf import CompiledOrEager
        from stalign.training.losses import ThreeTargetLoss

        base, overrides = MODELS[name]
        torch.manual_seed(0)
        self.model = stalign.create_model(base, genes=GENES, **overrides).to(device).train()
        self.loss = ThreeTargetLoss()
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.forward = CompiledOrEager(self.model) if compile else self.model
        self.device, self.precision = device, precision

    def step(self, batch: dict) -> None:
        from stalign.models.perf import autocast, fast_matmul

        with fast_matmul(self.device) if self.precision != "fp32" else _null(), autocast(self.device, self.precision):
            loss = self.loss(self.forward(batch))["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _null():
    import contextlib

    return contextlib.nullcontext()


def step_flops(trainer: Trainer, batch: dict) -> float:
    """FLOPs of forward + backward of one step (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.loss(trainer.model(batch))["loss"].backward()
    trainer.opt.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def largest_batch(name: str, device, *, start: int, limit: int = 8192) -> int:
    """Largest bf16 eager batch that trains one step without CUDA out-of-memory (doubling, then bisection)."""
    import torch

    def fits(b: int) -> bool:
        try:
            trainer = Trainer(name=name, device=device, precision="bf16", compile=False)
            trainer.step(make_batch(trainer.model, b, device))
            torch.cuda.synchronize(device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            trainer = None
            torch.cuda.empty_cache()

    good, bad = 0, None
    b = start
    while b <= limit and fits(b):
        good, b = b, b * 2
    bad = b if b <= limit else None
    if bad is None:
        return good
    while bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    p.add_argument("--batch", type=int, default=None, help="pairs per step (default 64 on CUDA, 4 on CPU)")
    p.add_argument("--repeat", type=int, default=None, help="timed steps (median)")
    p.add_argument("--compile", action="store_true", help="also torch.compile on the CPU")
    p.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search on CUDA")
    args = p.parse_args(argv)
    import torch

    device = setup(args)
    cuda = device.type == "cuda"
    names = args.models or (["stalign-tiny"] if args.quick else ["stalign-base", "small"] if cuda
                            else ["stalign-tiny", "small"])
    batch = args.batch or (64 if cuda else 4)
    repeat = args.repeat or (1 if args.quick else 10 if cuda else 3)
    load_before = load_average()
    peak = matmul_peak(device, n=1024 if args.quick else 8192 if cuda else 2048, dtype=torch.bfloat16)
    peak32 = matmul_peak(device, n=1024 if args.quick else 8192 if cuda else 2048, dtype=torch.float32)
    peak_dtype = "bf16"
    variants = [("fp32", False), ("bf16", False)] + ([("fp32", True), ("bf16", True)] if cuda or args.compile else [])
    rows = []
    for name in names:
        flops = None
        for precision, compiled in variants:
            trainer = Trainer(name=name, device=device, precision=precision, compile=compiled)
            data = make_batch(trainer.model, batch, device)
            if flops is None:
                flops = step_flops(trainer, data)
            seconds = median_seconds(lambda t=trainer, d=data: t.step(d), device, warmup=3 if compiled else 1,
                                     repeat=repeat)
            failed = compiled and trainer.forward.failed
            rows.append({"model": name, "batch": batch, "precision": precision,
                         "mode": ("compile" if not failed else "compile failed, eager") if compiled else "eager",
                         "pairs/s": batch / seconds, "GFLOP/step": flops / 1e9,
                         f"% of {peak_dtype} peak": 100 * flops / seconds / (peak * 1e12)})
            print(rows[-1], flush=True)
            del trainer, data
            if cuda:
                torch.cuda.empty_cache()
        if cuda and not args.no_max_batch:
            best = largest_batch(name, device, start=batch)
            if best == 0:
                print(f"{name}: not even one pair fits in GPU memory in bf16", flush=True)
                continue
            trainer = Trainer(name=name, device=device, precision="bf16", compile=False)
            data = make_batch(trainer.model, best, device)
            seconds = median_seconds(lambda t=trainer, d=data: t.step(d), device, warmup=1, repeat=repeat)
            f = flops * best / batch
            rows.append({"model": name, "batch": best, "precision": "bf16", "mode": "eager, largest batch",
                         "pairs/s": best / seconds, "GFLOP/step": f / 1e9,
                         f"% of {peak_dtype} peak": 100 * f / seconds / (peak * 1e12)})
            print(rows[-1], flush=True)
            del trainer, data
            torch.cuda.empty_cache()
    notes = [(f"measured {peak_dtype} matmul peak {peak:.2f} TFLOP/s (fp32 {peak32:.2f}) in the same run; 200 genes, 16 niche spots, "
              f"random init; FLOPs = forward + backward (FlopCounterMode)")]
    if not cuda:
        notes.append("CPU figures (no GPU in this run); the >= 30% utilisation target is for an H100")
    record(args, title=f"training step throughput on {device.type.upper()}", device=device, body=table(rows),
           load_before=load_before, notes=notes)


if __name__ == "__main__":
    main()
