"""``make demo``: the whole job end to end on real data, in stages, printing a result table.

    python -m stalign.demo [--out runs/demo] [--stages fetch,prep] [--synth-spots 1000]

Stages run in order, each under a header with its elapsed time; each reads and extends one ``DemoContext``
(``ctx.data`` for paths and objects, ``ctx.rows`` for the result table). Later stages (train, predict, evaluate)
register themselves with ``@stage(name)`` after ``prep``. The summary is also written to ``<out>/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SQUIDPY = "squidpy-visium-crop"


@dataclass(kw_only=True)
class DemoContext:
    """State shared by the stages: options, produced paths/objects, result rows and timings."""

    out: Path
    args: argparse.Namespace
    data: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # table name -> rows
    seconds: dict[str, float] = field(default_factory=dict)


StageFn = Callable[[DemoContext], None]
STAGES: dict[str, StageFn] = {}


def stage(name: str) -> Callable[[StageFn], StageFn]:
    """Register a demo stage (run in registration order)."""
    def deco(fn: StageFn) -> StageFn:
        STAGES[name] = fn
        return fn
    return deco


@stage("fetch")
def fetch_stage(ctx: DemoContext) -> None:
    """Download (or reuse from the cache) the real Visium crop through the project's own fetcher."""
    from data_prep.fetch import fetch

    folder = fetch(SQUIDPY)
    ctx.data["squidpy_dir"] = folder
    print(f"{SQUIDPY}: {folder}")
    for name in ("test_data.h5ad", "test_img.jpg"):
        print(f"  {name:16s} {(folder / name).stat().st_size / 1e6:6.2f} MB")


@stage("prep")
def prep_stage(ctx: DemoContext) -> None:
    """Shards for the real crop and for a synthetic slide (separate folders: their genes differ)."""
    from data_prep.pipeline import prepare
    from data_prep.readers import read_anndata_image
    from data_prep.synth import ensure_synthetic_slide

    a = ctx.args
    folder = ctx.data.get("squidpy_dir") or _fetched()
    real = read_anndata_image(folder / "test_data.h5ad", folder / "test_img.jpg", slide_id="squidpy_visium_crop")
    synth = ensure_synthetic_slide(ctx.out / "synthetic", n_spots=a.synth_spots, um_per_px=a.synth_um_per_px,
                                   seed=0, progress=not a.quiet)
    fake = read_anndata_image(synth.paths["adata"], synth.paths["image"], slide_id=synth.slide_id)
    ctx.data["synthetic_slide"] = synth
    pitch = read_anndata_image(real.adata, real.image_path, slide_id=real.slide_id, pixel_size_from="pitch")
    print(f"squidpy crop: {real.um_per_px:.4f} µm/px from the {real.pixel_size_source.split(' (')[0]}; the spot "
          f"pitch would give {pitch.um_per_px:.4f} µm/px ({pitch.pixel_size_source}) - choose with "
          "`stalign prep --pixel-size-from pitch` / `--um-per-px`")
    rows = ctx.rows.setdefault("prep", [])
    for name, sample in (("squidpy", real), ("synthetic", fake)):
        shards = ctx.out / "shards" / name
        manifest = prepare([sample], shards, n_top_genes=a.n_top_genes, workers=1, progress=not a.quiet)
        ctx.data[f"shards_{name}"] = shards
        for entry in manifest["slides"]:
            rows.append({"data": name, "slide": entry["slide_id"], "spots": entry.get("n_input_spots"),
                         "kept": entry["n_spots"], "dropped": entry["n_background_dropped"],
                         "padded": entry["n_padded"], "genes": len(manifest["genes"]),
                         "expression": manifest["expression"], "um_per_px": round(entry["um_per_px"], 4),
                         "pixel size from": entry["pixel_size_source"].split(" (")[0],
                         "shard MB": round((shards / entry["shard"]).stat().st_size / 1e6, 1)})
        print(f"{name}: {shards / 'manifest.json'}")


def _fetched() -> Path:
    from data_prep.fetch import fetch

    return fetch(SQUIDPY)


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table with one column per key of the first row."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(vals, width)).rstrip()

    return "\n".join([line(cols), line(["-" * w for w in width]), *(line(r) for r in cells)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stalign.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--synth-spots", type=int, default=1000, help="spots of the synthetic slide")
    p.add_argument("--synth-um-per-px", type=float, default=0.5, help="pixel size of the synthetic slide")
    p.add_argument("--n-top-genes", type=int, default=50, help="gene panel: top-N highly variable genes")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    ctx = DemoContext(out=args.out, args=args)
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    for name in (n for n in STAGES if n in names):
        print(f"\n=== stage {name} {'=' * max(3, 60 - len(name))}", flush=True)
        t0 = time.perf_counter()
        STAGES[name](ctx)
        ctx.seconds[name] = time.perf_counter() - t0
        print(f"--- {name} done in {ctx.seconds[name]:.1f} s", flush=True)
    print(f"\n=== results ({time.perf_counter() - t_all:.1f} s in all) {'=' * 30}")
    for table, rows in ctx.rows.items():
        print(f"\n[{table}]\n{format_table(rows)}")
    summary = {"stages": ctx.seconds, "tables": ctx.rows}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(f"\nsummary: {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
