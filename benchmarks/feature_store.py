"""The feature store (issue 23): `stalign bench` run twice on the same shards, and training steps/s of a model with
frozen image encoders fed crops (pixels) vs their stored trunk features.

    python benchmarks/feature_store.py                       # CPU: 1,200-spot synthetic slide, 224 px crops
    python benchmarks/feature_store.py --device cuda --spots 8000 --batch 64     # GPU suite step
    python benchmarks/feature_store.py --quick               # seconds: checks that the script runs

1. **bench, first vs second run**: ``stalign bench --shards S --encoders efficientnet-lite0`` as a command (wall
   time of the whole process, interpreter start included), first with an empty store (the encoder's features and
   the colour statistics are computed and stored), then again (read back), and with ``--no-cache-run`` a third
   time with ``--no-cache``. The tables of the runs must be identical (checked). Also the throughput of filling the store (spots/s of the first run's
   encoder extraction, from the entries' sidecars).
2. **training with frozen image encoders**: stalign-demo with its EfficientNet-Lite0 frozen (``freeze: true``, as the
   ablation's arms), one AdamW step of ThreeTargetLoss on batches of the shards; crops in (the frozen trunk runs
   forward every step) vs the trunk features from ``frozen_image_features`` (``ImageEncoder`` takes them as they
   are). Batches are built in memory beforehand for both, so the figure is the model's step alone.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, load_average, parser, record, setup, sync, table


def make_shards(spots: int, patch_px: int, out: Path) -> Path:
    """A synthetic slide of ``spots`` spots prepared into shards at ``patch_px`` (kept between runs)."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import ensure_synthetic_slide

    root = out / f"shards_{spots}_{patch_px}px"
    if not (root / "manifest.json").is_file():
        slide = ensure_synthetic_slide(out / f"slide_{spots}", n_spots=spots, um_per_px=1.0, seed=7, progress=False)
        sample = read_anndata_image(slide.paths["adata"], slide.paths["image"], slide_id=slide.slide_id)
        prepare([sample], root, n_top_genes=60, crop=CropSpec(patch_px=patch_px), workers=1, progress=False)
    return root


def bench_runs(root: Path, device: str, out: Path, genes: int, folds: int | None,
               no_cache_run: bool) -> tuple[list[dict], list[str]]:
    """Wall seconds of `stalign bench` commands (empty store, reuse[, --no-cache]); their tables compared."""
    shutil.rmtree(root / "features", ignore_errors=True)
    rows, tables = [], []
    runs = [("first run (empty store)", []), ("second run (store)", [])]
    runs += [("--no-cache", ["--no-cache"])] if no_cache_run else []
    for label, extra in runs:
        csv = out / f"bench_{len(tables)}.csv"
        cmd = [sys.executable, "-m", "stalign", "bench", "--shards", str(root), "--encoders", "efficientnet-lite0",
               "--genes", str(genes), "--device", device, "--quiet", "--out", str(csv)]
        cmd += ["--folds", str(folds), "--by", "spot"] if folds else []  # --quick: a tiny slide, timing only
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, *extra], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench failed:\n{proc.stdout}\n{proc.stderr}")
        store_line = next(line for line in proc.stdout.splitlines() if line.startswith("feature store"))
        rows.append({"run": label, "seconds": seconds, "store": store_line.split(": ", 1)[-1]})
        tables.append(csv.read_text())
    if len(set(tables)) != 1:
        raise SystemExit("the bench tables of the runs differ")
    notes = [f"the {len(tables)} tables are identical; second run {rows[0]['seconds'] / rows[1]['seconds']:.1f}x "
             "faster than the first"]
    computed = 0.0
    for side in (root / "features").rglob("features-*.json"):
        s = json.loads(side.read_text())
        computed += s["seconds"]
        if s["key"]["encoder"].get("spec") == "efficientnet-lite0":
            notes.append(f"filling the store (efficientnet-lite0, {s['shape'][0]} spots): {s['seconds']:.1f} s = "
                         f"{s['shape'][0] / s['seconds']:.1f} spots/s")
    notes.append(f"the features alone (encoder + colour statistics): {computed:.1f} s computed in the first run, "
                 f"{_read_seconds(root, device):.2f} s read back (in process, store loaded: "
                 "stalign.tasks.bench.encoder_features + shard_colour_features; no encoder is built on a hit, its "
                 "weights checksum is recorded); the rest of a run is the interpreter start and imports, the folds "
                 "and the PCA + ridge scoring (exact, closed form)")
    return rows, notes


def _read_seconds(root: Path, device: str) -> float:
    """Seconds to get every feature of the bench from the filled store (as a second run: identity, then reads)."""
    from stalign.tasks.bench import encoder_features, shard_colour_features

    t0 = time.perf_counter()
    encoder_features("efficientnet-lite0", root, device=device, progress=False)
    shard_colour_features(root)
    return time.perf_counter() - t0


def training_steps(root: Path, device, batch: int, steps: int) -> tuple[list[dict], list[str]]:
    """Steps/s of stalign-demo with frozen EfficientNet-Lite0, fed crops vs stored trunk features."""
    import numpy as np
    import torch

    import stalign
    from stalign.data.dataset import ShardDataset, collate
    from stalign.data.feature_store import FeatureStore, frozen_image_features
    from stalign.training.losses import ThreeTargetLoss

    ds = ShardDataset(root)
    patch = int(ds.manifest["patch_px"])
    frozen = {"spec": "efficientnet-lite0", "pretrained": True, "freeze": True, "unfreeze_last": 0,
              "kwargs": {"input_size": patch}}
    torch.manual_seed(0)
    model = stalign.create_model("stalign-demo", genes=ds.genes, spot_image=frozen, niche_image=frozen)
    store = FeatureStore(root)
    shutil.rmtree(store.folder, ignore_errors=True)  # time filling an empty store, not a hit of an earlier run
    store = FeatureStore(root)
    t0 = time.perf_counter()
    feats = frozen_image_features(model, store, batch_size=64, device=str(device))
    fill = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    batches = [collate([ds[int(i)] for i in rng.choice(len(ds), batch, replace=False)]) for _ in range(steps + 2)]
    model.to(device).train()
    loss_fn = ThreeTargetLoss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows = []
    for label, use_features in (("crops (frozen trunk runs forward)", False), ("stored trunk features", True)):
        times = []
        for k, b in enumerate(batches):
            b = {key: v.to(device) for key, v in b.items()}
            if use_features:
                idx = b["index"].cpu().numpy()
                b["spot_image"] = torch.from_numpy(feats["spot"][idx]).to(device)
                b["niche_image"] = torch.from_numpy(feats["niche"][idx]).to(device)
            sync(device)
            t = time.perf_counter()
            loss = loss_fn(model(b))["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            if k >= 2:  # two warm-up steps
                times.append(time.perf_counter() - t)
        rows.append({"input": label, "batch": batch, "steps/s": 1.0 / float(np.median(times)),
                     "pairs/s": batch / float(np.median(times))})
    notes = [f"training: {rows[1]['steps/s'] / rows[0]['steps/s']:.1f}x the steps/s from stored features; "
             f"filling the store for {len(ds)} spots (spot + niche crops): {fill:.1f} s, once"]
    return rows, notes


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--spots", type=int, default=1200, help="spots of the synthetic slide (default 1200)")
    p.add_argument("--patch-px", type=int, default=224, help="crop size of the shards (default 224)")
    p.add_argument("--train-spots", type=int, default=600,
                   help="spots of the (second) synthetic slide the training comparison runs on (default 600)")
    p.add_argument("--batch", type=int, default=16, help="training batch (default 16)")
    p.add_argument("--steps", type=int, default=6, help="timed training steps per input (default 6)")
    p.add_argument("--no-cache-run", action="store_true", help="also time a third run with --no-cache")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for the slide and shards (default $STALIGN_CACHE/bench/feature_store)")
    args = p.parse_args(argv)
    if args.quick:
        args.spots, args.train_spots, args.patch_px, args.batch, args.steps = 150, 150, 48, 8, 2
    device = setup(args)
    load = load_average()
    from stalign.data.fetch import cache_dir

    work = args.work or cache_dir() / "bench" / "feature_store"
    root = make_shards(args.spots, args.patch_px, work)
    bench_rows, notes = bench_runs(root, device.type, work, genes=50, folds=3 if args.quick else None,
                                  no_cache_run=args.no_cache_run)
    train_root = make_shards(args.train_spots, args.patch_px, work)
    train_rows, train_notes = training_steps(train_root, device, args.batch, args.steps)
    body = (f"`stalign bench --shards` ({args.spots} spots, {args.patch_px} px crops, efficientnet-lite0 + "
            f"baselines), wall seconds of the command:\n\n{table(bench_rows)}\n\nTraining with frozen image "
            f"encoders (stalign-demo, EfficientNet-Lite0 frozen, {args.train_spots}-spot slide, batch {args.batch}):\n\n{table(train_rows)}")
    record(args, title="Feature store: second bench run and training from stored features", device=device,
           body=body, load_before=load, notes=notes + train_notes)


if __name__ == "__main__":
    main()
