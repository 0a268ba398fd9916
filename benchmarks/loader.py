"""Training input pipeline: pairs/s of the per-sample path (today's) and the batched path, with and without
augmentation, and training steps/s end to end with each next to the model alone.

    python benchmarks/loader.py --threads 1                   # CPU: ~900-spot synthetic slide, 224 px crops
    python benchmarks/loader.py --device cuda --train-model stalign-base   # on a GPU (benchmarks/gpu_suite.sh)
    python benchmarks/loader.py --quick                       # 120 spots, 64 px (seconds)

Data: one synthetic slide (``stalign.lab.synth``, default 900 spots) prepared by ``stalign.data.pipeline.prepare``
with 224-px spot + niche crops (raw shards), made once under ``--work``. Paths, both over the same training split
(``build_train_data``, batch 64, shuffled, ``--workers`` DataLoader workers, pinned memory on CUDA):

- per-sample (before issue 27): one ``ShardDataset.__getitem__`` per spot (two HDF5 row reads), per-crop
  torchvision v2 ``he_train_transform`` in ``SeededTransform`` (augmentation) or no transform, ``collate``;
  the batch is then copied to the device.
- batched: ``ShardDataset.__getitems__`` (one chunk read per crop into the batch buffer, sorted per shard), the
  uint8 batch copied to the device, ``SeededBatchAugment`` there (same per-spot seeds).

"pairs/s" counts (spot, niche) pairs delivered on the device, augmented to the input size of each
``--sizes`` (224: stalign-base's ViT-B/16; 32: stalign-tiny); "no augmentation" delivers the raw crops.
On the CPU the two paths are timed ``--repeats`` times in turn (per-sample, batched, per-sample, ...; the
medians are reported), so a change in the machine's load hits both; with no workers the "per CPU-s" columns
divide by the process's CPU time rather than the wall time: the rate of one core of one's own, which
other jobs on a shared machine do not take away.
"crops/s": ways to read a batch's crops from a shard (page cache warm; the batched path uses the last).
"train steps/s": full training steps (forward, ``ThreeTargetLoss``, backward, AdamW) of ``--train-model`` at
its input size fed by each path, next to the same steps on one batch already on the device ("model alone");
"input share" = 1 - (end-to-end rate / model-alone rate).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, parser, record, setup, sync, table


def make_shards(work: Path, *, n_spots: int, patch_px: int) -> Path:
    """The synthetic slide's shards under ``work`` (made once per size)."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import make_synthetic_slide

    root = work / f"synth{n_spots}_{patch_px}px"
    if not (root / "shards" / "manifest.json").is_file():
        slide = make_synthetic_slide(root / "raw", n_spots=n_spots, progress=False)
        sample = read_anndata_image(slide.paths["adata"], slide.paths["image"])
        prepare([sample], root / "shards", n_top_genes=64, crop=CropSpec(patch_px=patch_px), progress=False)
    return root / "shards"


def read_strategies(root: Path, *, n: int) -> list[dict]:
    """crops/s of four ways to read a batch of 64 sorted random rows of one shard's ``spot_patches``."""
    import h5py
    import numpy as np

    from stalign.data.patch_reads import read_rows

    path = next((root / "shards").glob("*.h5"))
    with h5py.File(path, "r") as f:
        d = f["spot_patches"]
        rng = np.random.default_rng(0)
        sets = [np.sort(rng.choice(d.shape[0], 64, replace=False)) for _ in range(n)]
        out = np.empty((64, *d.shape[1:]), np.uint8)
        ways = {"h5py fancy indexing d[sorted rows]": lambda r: d[r],
                "covering slice d[lo:hi+1], then numpy": lambda r: d[r[0]:r[-1] + 1][r - r[0]],
                "one d[row] per crop": lambda r: np.stack([d[int(i)] for i in r]),
                "one read_direct_chunk per crop into the batch (read_rows)": lambda r: read_rows(d, r, out)}
        rows = []
        for name, fn in ways.items():
            fn(sets[0])
            t0 = time.perf_counter()
            for r in sets[: 2 if "fancy" in name else n]:  # fancy indexing is ~100x slower: 2 batches do
                fn(r)
            rows.append({"read of a batch's crops (one shard)": name,
                         "crops/s": 64 * (2 if "fancy" in name else n) / (time.perf_counter() - t0)})
            print(rows[-1], flush=True)
    return rows


class PerItem:
    """A dataset seen one item at a time (hides ``ShardDataset.__getitems__``: the per-sample read path)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def pipeline(root: Path, *, batched: bool, augment: bool, size: int, device, workers: int):
    """(DataLoader, batch -> device batch) of one path."""
    import torch
    from accelerate.utils import send_to_device

    from stalign.data.dataset import collate
    from stalign.models.batch_augment import BatchAugment
    from stalign.models.transforms import he_train_transform
    from stalign.training.data import build_train_data

    if batched:
        pair = tuple(BatchAugment(size, train=True) for _ in range(2)) if augment else None
    else:
        pair = (he_train_transform(size), he_train_transform(size)) if augment else None
    data = build_train_data(root=root, slides=None, val_fraction=0.0, split_by="spot", seed=0, niche_spots=16,
                            train_transforms=pair, eval_transforms=None, val_max_spots=0)
    ds = data.train if batched else PerItem(data.train)
    cuda = device.type == "cuda"
    dl = torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, drop_last=True, collate_fn=collate,
                                     num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                                     generator=torch.Generator().manual_seed(0))
    if data.augment is not None:
        return dl, lambda b: data.augment.to_device(b, device, epoch=0, non_blocking=cuda)
    return dl, lambda b: send_to_device(b, device, non_blocking=cuda)


def batches(dl, move, n: int):
    """``n`` device batches, cycling over the loader."""
    done = 0
    while True:
        for b in dl:
            yield move(b)
            done += 1
            if done == n:
                return


def pairs_per_s(root, *, batched, augment, size, device, workers, n) -> tuple[float, float]:
    """(pairs per wall second, pairs per CPU second of this process) over ``n`` batches."""
    dl, move = pipeline(root, batched=batched, augment=augment, size=size, device=device, workers=workers)
    next(iter(batches(dl, move, 1)))  # warm: open the shard, cache its arrays, start workers
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    count = sum(len(b["index"]) for b in batches(dl, move, n))
    sync(device)
    return count / (time.perf_counter() - t0), count / max(time.process_time() - c0, 1e-9)


def path_rates(root, *, augment, size, device, workers, n, repeats) -> dict[str, float]:
    """Median rates of the per-sample and the batched path, timed ``repeats`` times in turn."""
    runs: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for _ in range(repeats):
        for batched in (False, True):
            runs[batched].append(pairs_per_s(root, batched=batched, augment=augment, size=size, device=device,
                                             workers=workers, n=n))
    med = {b: [statistics.median(r[i] for r in runs[b]) for i in (0, 1)] for b in runs}
    return {"per-sample": med[False][0], "batched": med[True][0], "batched / per-sample": med[True][0] / med[False][0],
            "per-sample, per CPU-s": med[False][1], "batched, per CPU-s": med[True][1],
            "batched / per-sample, CPU": med[True][1] / med[False][1]}


class Steps:
    """A model + loss + AdamW; ``run(batches)`` -> steps/s."""

    def __init__(self, name: str, genes, device) -> None:
        import torch

        import stalign
        from stalign.training.losses import ThreeTargetLoss

        torch.manual_seed(0)
        self.model = stalign.create_model(name, genes=genes).to(device).train()
        self.size = self.model.spot_image_encoder.input_size
        self.loss, self.device = ThreeTargetLoss(), device
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, batch) -> None:
        from stalign.models.perf import autocast

        with autocast(self.device, "bf16" if self.device.type == "cuda" else "fp32"):
            loss = self.loss(self.model(batch))["loss"]
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, source, n: int) -> float:
        it = iter(source)
        self.step(next(it))  # warm
        sync(self.device)
        t0 = time.perf_counter()
        done = 0
        for b in it:
            self.step(b)
            done += 1
        sync(self.device)
        return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--work", type=Path, default=Path("/tmp/stalign_loader_bench"), help="synthetic data folder")
    p.add_argument("--spots", type=int, default=None, help="synthetic slide spots (default 900; quick 120)")
    p.add_argument("--patch-px", type=int, default=None, help="crop size in the shards (default 224; quick 64)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="augmented output sizes (default 224 32)")
    p.add_argument("--batches", type=int, default=None, help="batches of 64 timed per path (default 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: the main process, one core)")
    p.add_argument("--train-model", default="stalign-tiny", help="model of the end-to-end training steps")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per path (default 6)")
    p.add_argument("--repeats", type=int, default=None,
                   help="pairs/s timings per path, in turn, medians reported (default 3 on the CPU, 1 on a GPU "
                        "or with --quick)")
    args = p.parse_args(argv)
    device = setup(args)
    repeats = args.repeats or (3 if device.type == "cpu" and not args.quick else 1)
    n_spots = args.spots or (120 if args.quick else 900)
    patch = args.patch_px or (64 if args.quick else 224)
    sizes = args.sizes or ([32] if args.quick else [224, 32])
    n, n_steps = args.batches or (2 if args.quick else 8), args.steps or (2 if args.quick else 6)
    root = make_shards(args.work, n_spots=n_spots, patch_px=patch)
    load_before = load_average()
    reads, rows = read_strategies(root, n=n), []
    cpu_rates = device.type == "cpu" and args.workers == 0  # CPU time of this process is all the work
    for augment, size in [(False, patch)] + [(True, s) for s in sizes]:
        rates = path_rates(root, augment=augment, size=size, device=device, workers=args.workers, n=n,
                           repeats=repeats)
        rows.append({"what": f"pairs/s, {'augmented to ' + str(size) + ' px' if augment else 'no augmentation'}",
                     **{k: v for k, v in rates.items() if cpu_rates or "CPU" not in k}})
        print(rows[-1], flush=True)
    from stalign.data.dataset import ShardDataset

    steps = Steps(args.train_model, ShardDataset(root).genes, device)
    for augment in (False, True):
        rates = {}
        for batched in (False, True):
            dl, move = pipeline(root, batched=batched, augment=augment, size=steps.size, device=device,
                                workers=args.workers)
            rates[batched] = steps.run(batches(dl, move, n_steps + 1), n_steps)
        one = next(iter(batches(*pipeline(root, batched=True, augment=augment, size=steps.size, device=device,
                                          workers=0), 1)))
        alone = steps.run([one] * (n_steps + 1), n_steps)
        rows.append({"what": f"{args.train_model} train steps/s, {'augmented' if augment else 'no augmentation'}",
                     "per-sample": rates[False], "batched": rates[True], "batched / per-sample": rates[True] / rates[False],
                     "model alone": alone, "input share (per-sample)": 1 - rates[False] / alone,
                     "input share (batched)": 1 - rates[True] / alone})
        print(rows[-1], flush=True)
    notes = [f"synthetic slide of {n_spots} spots, {patch} px spot + niche crops (raw shards), batch 64, "
             f"{args.workers} DataLoader workers, {n} batches per pairs/s figure (median of {repeats} timed in "
             f"turn with the other path), {n_steps} training steps; old and new paths measured in the same run"]
    if device.type == "cpu":
        notes.append("per core: one torch thread and no workers give the figure of one core")
    if cpu_rates:
        notes.append("'per CPU-s': pairs per second of this process's CPU time (what one core of its own gives; "
                     "the wall-time columns also carry the other jobs' share of the machine)")
    record(args, title=f"training input pipeline on {device.type.upper()}", device=device,
           body=table(reads) + "\n\n" + table(rows, ["what", "per-sample", "batched", "batched / per-sample"] + (
               ["per-sample, per CPU-s", "batched, per CPU-s", "batched / per-sample, CPU"] if cpu_rates else []) + [
               "model alone", "input share (per-sample)", "input share (batched)"]),
           load_before=load_before, notes=notes)


if __name__ == "__main__":
    main()
