"""Throughput of ``stalign prep`` (spot + niche crops -> shards) on a 20,000-spot synthetic pyramidal TIFF.

    python benchmarks/prep_throughput.py                      # generate (or reuse) the slide, time 1 and 2 workers
    python benchmarks/prep_throughput.py --n-spots 2000 --no-record

The slide is cached under ``$STALIGN_CACHE/bench/`` (``~/.cache/stalign/bench/``) and reused when its
``truth.json`` matches the requested size and its TIFF still has the recorded sha256. ``prepare``'s workers read
crop batches of the one slide in parallel processes (the main process is the only shard writer). Each run writes
fresh shards into a temporary folder and is timed end to end (expression, tissue mask, crops, shard writing).
The table is printed and, unless ``--no-record``, appended to ``benchmarks/RESULTS.md`` with the machine.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cached_slide(root: Path, *, n_spots: int, um_per_px: float, seed: int) -> tuple[Path, Path, float | None]:
    """(tif, h5ad, generation seconds or None when reused) of the benchmark slide."""
    from stalign.lab.synth import ensure_synthetic_slide

    folder = root / f"synth-{n_spots}-{um_per_px:g}umpx-seed{seed}"
    print(f"synthetic slide: {folder} (generated unless an intact one is there) ...", flush=True)
    slide = ensure_synthetic_slide(folder, n_spots=n_spots, um_per_px=um_per_px, seed=seed)
    return slide.paths["image"], slide.paths["adata"], slide.seconds or None


def samples_for(tif: Path, h5ad: Path) -> list:
    """The slide as one sample, read by the real reader."""
    from stalign.data.readers import read_anndata_image

    return [read_anndata_image(h5ad, tif, slide_id=tif.stem)]


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def time_prep(samples: list, *, workers: int, progress: bool, **options) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds, manifest) of one ``prepare`` run into a fresh folder (``options``: crop,
    patch_compression)."""
    from stalign.data.pipeline import prepare

    with tempfile.TemporaryDirectory(prefix="stalign-bench-") as out:
        t0, c0 = time.perf_counter(), cpu_seconds()
        manifest = prepare(samples, out, workers=workers, progress=progress, **options)
        return time.perf_counter() - t0, cpu_seconds() - c0, manifest


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def load() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    from stalign.data.crop_spec import CropSpec
    from stalign.data.fetch import cache_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-spots", type=int, default=20_000)
    p.add_argument("--um-per-px", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--cache", type=Path, default=None, help="slide cache (default: $STALIGN_CACHE/bench)")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--note", default="", help="free text recorded with the figures (e.g. machine load)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--resample", choices=("bilinear", "lanczos"), default="bilinear", help="crop filter (default bilinear)")
    p.add_argument("--patch-compression", choices=("none", "gzip"), default="none", help="patch storage (default none)")
    args = p.parse_args(argv)

    tif, h5ad, gen_s = cached_slide(args.cache or cache_dir() / "bench", n_spots=args.n_spots,
                                    um_per_px=args.um_per_px, seed=args.seed)
    load_before = load()
    rows = []
    for workers in args.workers:
        samples = samples_for(tif, h5ad)
        seconds, cpu, manifest = time_prep(samples, workers=workers, progress=not args.quiet,
                                           crop=CropSpec(resample=args.resample),
                                           patch_compression=args.patch_compression)
        kept = sum(s["n_spots"] for s in manifest["slides"])
        dropped = sum(s["n_background_dropped"] for s in manifest["slides"])
        rows.append({"spots": args.n_spots, "kept": kept, "dropped": dropped,
                     "workers": workers, "seconds": seconds, "cpu": cpu, "spots_per_s": kept / seconds})
        print(f"  {workers} worker(s): {seconds:.1f} s", flush=True)

    header = ("| spots | kept (on tissue) | workers | seconds | CPU seconds | spots/s |\n"
              "|---:|---:|---:|---:|---:|---:|")
    lines = [f"| {r['spots']:,} | {r['kept']:,} | {r['workers']} | {r['seconds']:.1f} | "
             f"{r['cpu']:.1f} | {r['spots_per_s']:.1f} |" for r in rows]
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_record:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "n/a"
        size = tif.stat().st_size / 2**20
        section = [
            f"\n## prep throughput, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (commit {commit})\n",
            f"- machine: {machine()}; load average before {load_before}, after {load()}",
            f"- command: `{shlex.join(['python', 'benchmarks/prep_throughput.py', *(argv or sys.argv[1:])])}`",
            f"- slide: {tif.name}, {args.n_spots:,} spots at {args.um_per_px:g} µm/px, {size:,.0f} MiB TIFF"
            + (f", generated in {gen_s:.0f} s" if gen_s is not None else ", reused from the cache"),
            (f"- timed: `stalign.data.pipeline.prepare` end to end ({args.resample} crops, patch storage "
             f"{args.patch_compression}; spot 112 µm + niche 336 µm crops at 224 px, "
             "top-50 HVG panel, tissue mask, kNN, HDF5 shards); spots/s = kept spots / wall seconds; CPU "
             "seconds = user + system of this process and its worker processes"),
        ]
        if args.note:
            section.append(f"- note: {args.note}")
        section += ["", table, ""]
        new = not args.results.exists()
        with open(args.results, "a") as fh:
            if new:
                fh.write("# Benchmark results\n\nAppended by the scripts in `benchmarks/`; newest last.\n")
            fh.write("\n".join(section))
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
