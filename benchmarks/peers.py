"""stalign and its peers in one run, on the same generated slide and bank: prep, retrieval, whole-slide prediction.

    python benchmarks/peers.py                          # 40,000² px JPEG pyramid at 0.25 µm/px, 10,000 spots, 3 reps
    python benchmarks/peers.py --slide-px 16384 --spots 1500 --sections prep
    python benchmarks/peers.py --slide-px 16384 --spots 1500 --sections prep --slides 8   # a folder of slides
    python benchmarks/peers.py --quick                  # tiny sizes, 1 repetition, prints only (the test suite)

- prep (``benchmarks/peer_prep.py``, each run in its own process, peak memory of its process tree): ``stalign
  prep`` (spot 112 µm + niche 336 µm crops at 224 px, expression, tissue mask, kNN, shard; ``--workers`` 1 and 2)
  vs a HEST-style per-patch dump and the plain openslide + h5py loop (spot crops only).
- retrieval: ``stalign.tasks.fast_topk.search`` (what ``ReferenceBank.topk`` runs) vs faiss ``IndexFlatIP``
  (skipped with a message when faiss is not installed) and plain torch matmul + topk, clustered bank, 1 thread.
- whole-slide prediction: ``benchmarks/wsi_predict.py``'s package path (``stalign predict``'s readers, embedder,
  retrieval, write) vs its plain path (openslide ``read_region`` + bilinear + fp32 model), stalign-tiny.

Every figure is the median (min-max) of ``--repeat`` runs, the repetitions interleaved so load changes hit all
methods; ratios are computed per repetition. Unless ``--no-record`` (default in ``--quick`` unless ``--record``)
the table is appended to benchmarks/RESULTS.md with the machine and load average.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, load_average, parser, record, table  # noqa: E402


def spread(values: list[float], digits: str = ".3g") -> str:
    """'median (min-max)' of ``values`` (just the value for one)."""
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, digits)
    return f"{format(med, digits)} ({format(min(values), digits)}-{format(max(values), digits)})"


def slide_tiles(folder: Path, args) -> str:
    """The generated slide's tile compression ('JPEG (q90)', or deflate where imagecodecs was missing)."""
    spec = folder / f"slide-{args.slide_px}-{args.spots}" / "spec.json"
    tiles = json.loads(spec.read_text()).get("tiles") if spec.exists() else None
    return "JPEG (q90)" if tiles == "jpeg" else "deflate" if tiles == "zlib" else "(no slide)"


def prep_section(args, folder: Path) -> list[dict]:
    from peer_prep import make_slide

    t0 = time.perf_counter()
    tif, h5ad = make_slide(folder / f"slide-{args.slide_px}-{args.spots}", size_px=args.slide_px, n_spots=args.spots)
    print(f"slide {tif} ({tif.stat().st_size / 2**20:,.0f} MiB) ready in {time.perf_counter() - t0:.0f} s", flush=True)
    many = {"slides": args.slides}  # copies of the slide, one after another (each method's own loop over slides)
    configs = [(f"stalign prep, {w} worker{'s' * (w > 1)} (spot + niche)", "stalign", {"workers": w, **many})
               for w in args.workers]
    configs += [("HEST-style per-patch dump (spot only)", "hest", many),
                ("plain openslide + h5py loop (spot only)", "plain", many)]
    if args.slides > 1:
        print(f"{args.slides} copies of the slide per run", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in configs}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for rep in range(args.repeat):
        for name, runner, options in configs:
            with tempfile.TemporaryDirectory(prefix="stalign-peers-", dir=folder) as out:
                cmd = [sys.executable, str(HERE / "peer_prep.py"), runner, str(tif), str(h5ad), out,
                       json.dumps(options)]
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if res.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{res.stderr[-3000:]}")
            runs[name].append({**json.loads(res.stdout.strip().splitlines()[-1]), "load": os.getloadavg()[0]})
            r = runs[name][-1]
            print(f"  rep {rep + 1} {name}: {r['spots'] / r['seconds']:.1f} spots/s, peak {r['peak_mib']:.0f} MiB, "
                  f"load {r['load']:.1f}", flush=True)
    plain, hest = runs[configs[-1][0]], runs[configs[-2][0]]
    rows = []
    for name, _, _ in configs:
        rs = runs[name]
        rate = [r["spots"] / r["seconds"] for r in rs]
        rows.append({"workload": "prep" if args.slides == 1 else f"prep, {args.slides} slides", "method": name, "figure": f"{spread(rate)} spots/s",
                     "CPU ms/spot": spread([r["cpu"] / r["spots"] * 1e3 for r in rs]),
                     "peak MiB (tree)": spread([r["peak_mib"] for r in rs], ".0f"),
                     "output MiB": spread([r["output_mib"] for r in rs], ".0f"),
                     "x plain": spread([a / (p["spots"] / p["seconds"]) for a, p in zip(rate, plain)]),
                     "x HEST-style": spread([a / (h["spots"] / h["seconds"]) for a, h in zip(rate, hest)]),
                     "load (1 min)": spread([r["load"] for r in rs], ".1f")})
    if len(args.workers) > 1:
        one, many = runs[configs[0][0]], runs[configs[len(args.workers) - 1][0]]
        rows.append({"workload": "prep" if args.slides == 1 else f"prep, {args.slides} slides", "method": f"scaling, {args.workers[-1]} vs {args.workers[0]} workers",
                     "figure": spread([(b["spots"] / b["seconds"]) / (a["spots"] / a["seconds"])
                                       for a, b in zip(one, many)]) + "x"})
    return rows


def retrieval_section(args) -> list[dict]:
    import torch
    from retrieval import clustered, plain_topk

    from stalign.tasks.fast_topk import prepare_bank, recall, search

    torch.set_num_threads(args.threads or 1)
    bank, queries = clustered(args.bank, 256, seed=0), clustered(args.queries, 256, seed=1)
    exact = plain_topk(queries, bank, args.k, query_chunk=256)[1].numpy()
    methods = {"plain torch fp32 matmul + topk": lambda: plain_topk(queries, bank, args.k, query_chunk=256)}
    prepared = prepare_bank(bank, device="cpu")
    methods["stalign fast_topk.search (ReferenceBank.topk)"] = lambda: search(queries, prepared, args.k,
                                                                              query_chunk=256)
    try:
        import faiss
    except ImportError:
        print("faiss not installed: no faiss rows (pip install faiss-cpu, for the benchmark only)")
        faiss = None
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatIP(256)
        index.add(bank.numpy())
        qn = queries.numpy()
        methods[f"faiss {faiss.__version__} IndexFlatIP"] = lambda: [torch.from_numpy(a) for a in index.search(qn, args.k)]
    times: dict[str, list[float]] = {m: [] for m in methods}
    found = {m: fn()[1] for m, fn in methods.items()}  # warm-up, and the indices for recall
    for _ in range(args.repeat):
        for m, fn in methods.items():
            t0 = time.perf_counter()
            fn()
            times[m].append(time.perf_counter() - t0)
    qps = {m: [args.queries / s for s in ts] for m, ts in times.items()}
    faiss_name = next((m for m in methods if m.startswith("faiss")), None)
    plain_name = "plain torch fp32 matmul + topk"
    rows = []
    for m in methods:
        rows.append({"workload": f"retrieval, {args.bank:,} x 256 bank, {args.queries:,} queries, k={args.k}, "
                                 f"{torch.get_num_threads()} thread(s)",
                     "method": m, "figure": f"{spread(qps[m])} q/s",
                     "recall@k": f"{recall(torch.as_tensor(found[m]).numpy(), exact):.3f}",
                     "x plain": spread([a / b for a, b in zip(qps[m], qps[plain_name])]),
                     "x faiss": spread([a / b for a, b in zip(qps[m], qps[faiss_name])]) if faiss_name else "n/a"})
    return rows


def wsi_section(args, folder: Path) -> list[dict]:
    import argparse

    import numpy as np
    import torch
    from peer_prep import make_slide
    from wsi_predict import NICHE_UM, SPOT_UM, run_package, run_plain, tile_centres

    import stalign
    from stalign.data.slide import open_slide
    from stalign.tasks.retrieval import ReferenceBank

    tif, _ = make_slide(folder / f"slide-{args.slide_px}-{args.spots}", size_px=args.slide_px, n_spots=args.spots)
    slide = open_slide(tif)
    coords, _ = tile_centres(*slide.dimensions, tiles=args.wsi_tiles, spot_px=SPOT_UM / slide.um_per_px)
    genes = [f"GENE{i}" for i in range(50)]
    model = stalign.create_model("stalign-tiny", genes=genes)
    rng = np.random.default_rng(0)
    n_bank = 2000 if args.quick else 20_000
    bank = ReferenceBank(embeddings=rng.normal(size=(n_bank, model.config.embed_dim)).astype(np.float32),
                         expression=rng.gamma(1.0, 1.0, (n_bank, 50)).astype(np.float32), genes=genes,
                         info={"spot_um": SPOT_UM, "niche_um": NICHE_UM, "patch_px": args.patch_px,
                               "resample": "bilinear"})
    opts = argparse.Namespace(patch_px=args.patch_px, workers=args.wsi_readers, batch=16, resample="bilinear")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    pkg, plain = [], []
    with tempfile.TemporaryDirectory(prefix="stalign-peers-wsi-", dir=folder) as tmp:
        for _ in range(args.repeat):
            pkg.append(len(coords) / run_package(model, slide, coords, bank, device=torch.device("cpu"), args=opts,
                                                 out=Path(tmp))["total"])
            plain.append(len(coords) / run_plain(model, str(tif), coords, bank, mpp=slide.um_per_px,
                                                 device=torch.device("cpu"), args=opts, out=Path(tmp))["total"])
    slide.close()
    what = f"whole-slide prediction, {len(coords):,} tiles, stalign-tiny, {args.patch_px} px, CPU"
    return [{"workload": what, "method": f"stalign predict path ({args.wsi_readers} readers)",
             "figure": f"{spread(pkg)} tiles/s", "x plain": spread([a / b for a, b in zip(pkg, plain)])},
            {"workload": what, "method": "plain read_region + bilinear + fp32 model", "figure": f"{spread(plain)} tiles/s",
             "x plain": "1"}]


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--sections", nargs="+", choices=("prep", "retrieval", "wsi"), default=["prep", "retrieval", "wsi"])
    p.add_argument("--repeat", type=int, default=None, help="repetitions (default 3; 1 with --quick)")
    p.add_argument("--slide-px", type=int, default=None, help="slide side in px (default 40,000; 4,096 --quick)")
    p.add_argument("--spots", type=int, default=None, help="spots (default 10,000; 24 --quick)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="stalign prep workers to run")
    p.add_argument("--slides", type=int, default=1,
                   help="prep: slides per run (copies of the generated one, as from a folder of many slides)")
    p.add_argument("--bank", type=int, default=None, help="retrieval bank rows (default 200,000; 5,000 --quick)")
    p.add_argument("--queries", type=int, default=None, help="default 1,000; 64 --quick")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--wsi-tiles", type=int, default=None, help="prediction tiles (default 1,000; 16 --quick)")
    p.add_argument("--wsi-readers", type=int, default=2)
    p.add_argument("--patch-px", type=int, default=224, help="prediction crop size (default 224; 32 --quick)")
    p.add_argument("--cache", type=Path, default=None, help="slide folder (default $STALIGN_CACHE/bench/peers)")
    p.add_argument("--record", action="store_true", help="with --quick: append to RESULTS.md anyway")
    args = p.parse_args(argv)
    q = args.quick
    args.repeat = args.repeat or (1 if q else 3)
    args.slide_px = args.slide_px or (4096 if q else 40_000)
    args.spots = args.spots or (24 if q else 10_000)
    args.bank = args.bank or (5000 if q else 200_000)
    args.queries = args.queries or (64 if q else 1000)
    args.wsi_tiles = args.wsi_tiles or (16 if q else 1000)
    args.patch_px = 32 if q and args.patch_px == 224 else args.patch_px
    args.no_record = args.no_record or (q and not args.record)
    from stalign.data.fetch import cache_dir

    folder = args.cache or cache_dir() / "bench" / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    rows = []
    if "prep" in args.sections:
        rows += prep_section(args, folder)
    if "retrieval" in args.sections:
        rows += retrieval_section(args)
    if "wsi" in args.sections:
        rows += wsi_section(args, folder)
    columns = ["workload", "method", "figure", "x plain", "x HEST-style", "x faiss", "recall@k", "CPU ms/spot",
               "peak MiB (tree)", "output MiB", "load (1 min)"]
    columns = [c for c in columns if any(c in r for r in rows)]
    notes = [f"median (min-max) of {args.repeat} interleaved repetition(s); ratios per repetition",
             f"slide: generated {slide_tiles(folder, args)} tiled pyramidal TIFF, {args.slide_px:,}² px at 0.25 µm/px, "
             "levels 2x apart, "
             f"{args.spots:,} spots requested on a square grid inside the tissue ellipse"]
    record(args, title="stalign vs peers, same run (benchmarks/peers.py)", device="cpu", body=table(rows, columns),
           load_before=load_before, notes=notes)


if __name__ == "__main__":
    main()
