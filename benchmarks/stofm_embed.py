"""Throughput of ``stofm.embed`` (cells/s) on a synthetic slide (random counts on a random point cloud).

    python benchmarks/stofm_embed.py --cells 100000 --model stofm-tiny --device cpu --dtype fp32
    python benchmarks/stofm_embed.py --cells 100000 --model stofm-small --device cuda --dtype fp32 bf16
    python benchmarks/stofm_embed.py --cells 5000 20000 80000 --threads 1   # linear in cells? (last column)

Each configuration (model × attention path × dtype × virtual-cell clustering) embeds the whole slide once
after a warm-up on a small slide; the table splits the time into "prepare" (cell encoder + virtual cells +
tiling) and the SE(2) transformer; with several ``--cells`` the last column is each run's time per cell over the
smallest slide's (1.0 = linear). The table is printed and, unless ``--no-record``, appended to ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import itertools
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.prep_throughput import load, machine  # noqa: E402 (after the sys.path line, so the script runs from anywhere)


def synthetic_slide(n_cells: int, n_genes: int, *, seed: int = 0):
    """AnnData with Poisson counts (gene-specific rates) on uniform random points of a 1 cm × 1 cm slide (µm)."""
    import anndata as ad
    import numpy as np
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.3, 1.0, size=n_genes).astype(np.float32)
    X = sp.csr_matrix(rng.poisson(rates, size=(n_cells, n_genes)).astype(np.float32))
    a = ad.AnnData(X=X, obsm={"spatial": rng.uniform(0, 10_000, size=(n_cells, 2))})
    a.var_names = [f"gene{i}" for i in range(n_genes)]
    return a


def run_one(adata, model, *, batch_size: int, dtype: str, device: str, cluster_method: str = "kmeans",
            **embed_kw) -> dict:
    import torch

    from stofm.embedding import embed

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    embed(adata, model, batch_size=batch_size, dtype=dtype, progress=False, cluster_method=cluster_method, **embed_kw)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    total = time.perf_counter() - start
    info = adata.uns["stofm"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return {"seconds": total, "cells_per_s": adata.n_obs / total, "prepare_s": info["seconds"]["prepare"],
            "transformer_s": info["seconds"]["transformer"], "tiles": info["n_tiles"], "peak_gib": peak}


def run_original(adata, *, batch_size: int, split_num: int, device: str, layers: int = 12) -> dict:
    """The original SToFM (``stofm-original``: released shape, ``layers`` layers, random weights, its Leiden
    hypernodes and tiles) through ``stofm.embed`` on the same slide, from 256-d unit cell embeddings (its cell BERT
    is a separate step)."""
    import numpy as np
    import torch

    from stofm.model import create_model

    torch.manual_seed(0)
    model = create_model("stofm-original", genes=list(adata.var_names), depth=layers, cells_per_tile=split_num,
                         device=device)
    emb = np.random.default_rng(0).standard_normal((adata.n_obs, 256)).astype(np.float32)
    adata = adata.copy()
    adata.obsm["X_cells"] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return run_one(adata, model, batch_size=batch_size, dtype="fp32", device=device, cluster_method="original",
                   cell_key="X_cells")


def _runs(args, slide, warm) -> list[dict]:
    """Every configuration of ``args`` on ``slide`` (each after a warm-up on ``warm``)."""
    import torch

    from stofm.model import create_model

    rows = []
    for name in args.model:
        torch.manual_seed(0)
        model = create_model(name, genes=list(slide.var_names), device=args.device,
                             cells_per_tile=args.cells_per_tile)
        for impl in args.attn_impl:
            model.se2.set_attn_impl(impl)
            for dtype, cm in itertools.product(args.dtype, args.cluster_method):
                kw = {"batch_size": args.batch_size, "dtype": dtype, "device": args.device, "cluster_method": cm}
                run_one(warm.copy(), model, **kw)
                res = run_one(slide.copy(), model, **kw)
                rows.append({"model": name, "attn": impl, "dtype": dtype, "clusters": cm, "cells": slide.n_obs, **res})
                print(f"{name} {impl} {dtype} {cm} {slide.n_obs} cells: {res['cells_per_s']:.0f} cells/s "
                      f"({res['seconds']:.1f}s)", flush=True)
    if args.original:
        kw = {"batch_size": args.batch_size, "split_num": args.cells_per_tile, "device": args.device,
              "layers": args.original_layers}
        run_original(warm, **kw)
        res = run_original(slide, **kw)
        rows.append({"model": f"original SToFM ({args.original_layers}x256, 32 heads)", "attn": "manual",
                     "dtype": "fp32", "clusters": "leiden", "cells": slide.n_obs, **res})
        print(f"original: {res['cells_per_s']:.0f} cells/s ({res['seconds']:.1f}s)", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000], help="cells per slide; several: a sweep")
    p.add_argument("--genes", type=int, default=500, help="synthetic gene panel size")
    p.add_argument("--model", nargs="+", default=["stofm-tiny"],
                   help="config names (stofm-tiny/-small/-base, stofm-original(-tiny): the original architecture)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", default=["fp32"], choices=("fp32", "bf16"))
    p.add_argument("--attn-impl", nargs="+", default=["sdpa"], choices=("manual", "sdpa"))
    p.add_argument("--cluster-method", nargs="+", default=["kmeans"], choices=("kmeans", "leiden", "original"),
                   help="virtual-cell clustering (leiden needs igraph: pip install 'stalign[leiden]')")
    p.add_argument("--batch-size", type=int, default=4, help="sub-slices per forward pass")
    p.add_argument("--cells-per-tile", type=int, default=1000)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--note", default="", help="free text recorded with the figures")
    p.add_argument("--original", action="store_true",
                   help="also time the original SToFM's SE(2) pipeline (released shape, Leiden hypernodes)")
    p.add_argument("--original-layers", type=int, default=12, help="layers of the original model (released: 12)")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load()
    rows = []
    for n_cells in args.cells:
        t0 = time.perf_counter()
        slide = synthetic_slide(n_cells, args.genes)
        warm = synthetic_slide(min(n_cells, 2000), args.genes, seed=1)
        print(f"synthetic slide: {n_cells} cells x {args.genes} genes ({time.perf_counter() - t0:.1f}s)")
        rows += _runs(args, slide, warm)
    per_cell = {}  # time per cell of the smallest slide, per configuration
    for r in sorted(rows, key=lambda r: r["cells"]):
        key = (r["model"], r["attn"], r["dtype"], r["clusters"])
        per_cell.setdefault(key, r["seconds"] / r["cells"])
        r["linear"] = r["seconds"] / r["cells"] / per_cell[key]
    header = ("| model | attention | dtype | virtual cells by | cells | tiles | total s | prepare s | SE(2) s | cells/s "
              "| peak GPU GiB | time per cell / smallest slide's |\n"
              "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    lines = [f"| {r['model']} | {r['attn']} | {r['dtype']} | {r['clusters']} | {r['cells']:,} | {r['tiles']} | "
             f"{r['seconds']:.1f} | "
             f"{r['prepare_s']:.1f} | {r['transformer_s']:.1f} | {r['cells_per_s']:,.0f} | "
             + ("n/a" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.1f}") + f" | {r['linear']:.2f} |"
             for r in rows]
    table = "\n".join([header, *lines])
    print(table)
    if not args.no_record:
        dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
        cmd = "python benchmarks/stofm_embed.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        section = (f"\n## stofm embed throughput ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                   f"- machine: {machine()}; device: {dev}; torch {torch.__version__}, "
                   f"{torch.get_num_threads()} CPU threads\n- command: `{cmd}`\n"
                   f"- load average before/after: {load_before} / {load()}\n"
                   + (f"- note: {args.note}\n" if args.note else "") + f"\n{table}\n")
        with args.results.open("a") as fh:
            fh.write(section)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
