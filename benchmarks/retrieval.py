"""Retrieval throughput: queries/s of cosine top-k (k=50) over a reference bank, plain vs the package path.

    python benchmarks/retrieval.py --device cuda                 # 1,000,000 x 256 bank, 4,096 queries
    python benchmarks/retrieval.py --device cpu --bank 200000 --queries 512
    python benchmarks/retrieval.py --quick                       # 20,000-row bank (seconds)
    python benchmarks/retrieval.py --device cpu --bank 1000000 --index flat ivf hnsw   # faiss indexes for huge banks

Rows: the plain way (one ``(q @ bank.T).topk(k)`` per query chunk, fp32 and bf16 bank), the peer faiss
``IndexFlatIP`` (exact inner product, same threads; when ``faiss`` is installed: ``pip install faiss-cpu``, for the
benchmark only) and the package's ``stalign.tasks.fast_topk.search`` (what ``ReferenceBank.topk`` runs: bf16 bank +
exact fp32 re-scoring on CUDA and on CPUs with native bf16 matmuls, fp32 otherwise; fp16/bf16 storage rows too). Recall = overlap with the exact fp32 top-k. Embeddings are
clustered (many near-ties, like spots of similar tissue), not uniform noise. Bank placement is not timed.

``--index ivf hnsw`` adds the faiss indexes ``ReferenceBank.topk(index=...)`` uses for banks too large for brute
force (``stalign.tasks.ann_index``: ``IndexIVFFlat`` / ``IndexHNSWFlat`` over unit vectors, 2k candidates
re-scored exactly), one row per ``--nprobe`` / ``--ef-search`` value, with the one-off build time; ``--index ivf
hnsw`` alone (without ``flat``) keeps only the package's own brute-force row (and the exact reference).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, median_seconds, parser, record, setup, table


def clustered(n: int, dim: int, *, seed: int, centres: int = 1024):
    import torch

    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=torch.Generator().manual_seed(12345))
    x = c[torch.randint(0, centres, (n,), generator=g)] + 0.7 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def plain_topk(q, bank, k: int, *, query_chunk: int):
    """What a user writes: a matmul and a full-width topk per query chunk (bank already normalised)."""
    import torch

    out = [(q[s:s + query_chunk].to(bank.dtype) @ bank.T).topk(k, dim=1) for s in range(0, len(q), query_chunk)]
    return torch.cat([o.values for o in out]), torch.cat([o.indices for o in out])


def index_rows(args, bank, queries, exact_idx, rows: list, run) -> None:
    """Rows of the faiss IVF / HNSW engines of ``ReferenceBank.topk`` (``--index ivf hnsw``): build once (timed),
    then one row per search setting; the build time and parameters go into the row."""
    import time

    import numpy as np

    from stalign.tasks.ann_index import default_params
    from stalign.tasks.retrieval import ReferenceBank

    kinds = [k for k in args.index if k != "flat"]
    if not kinds:
        return
    import faiss
    import torch

    faiss.omp_set_num_threads(torch.get_num_threads())
    ref = ReferenceBank(embeddings=bank, expression=np.zeros((len(bank), 1), np.float32), genes=["g"])
    for kind in kinds:
        params = default_params(kind, len(bank))
        t0 = time.perf_counter()
        ann = ref.ann_index(kind, params, progress=not args.quick)
        build = time.perf_counter() - t0
        if kind == "ivf":
            settings = [{"nprobe": p} for p in args.nprobe or sorted({max(1, params["nprobe"] // 2), params["nprobe"],
                                                                       min(params["nlist"], 4 * params["nprobe"])})]
        else:
            settings = [{"ef_search": e} for e in args.ef_search or (100, 200, 400)]
        for setting in settings:
            ann.params.update(setting)
            label = ", ".join(f"{k} {v}" for k, v in {**params, **setting}.items())
            run(f"package {kind} ({label}) + exact re-scoring",
                lambda s=setting, kind=kind: [torch_of(a) for a in ref.topk(queries.numpy(), args.k, index=kind,
                                                                              index_params=s)])
            rows[-1]["build s (once)"] = build


def torch_of(a):
    import torch

    return torch.from_numpy(a)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--bank", type=int, default=None, help="bank rows (default 1,000,000 on CUDA, 200,000 on CPU)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--queries", type=int, default=None, help="default 4,096 on CUDA, 512 on CPU")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--index", nargs="+", choices=("flat", "ivf", "hnsw"), default=["flat"],
                   help="engines to measure (default flat: brute force and the faiss IndexFlatIP peer)")
    p.add_argument("--nprobe", type=int, nargs="+", default=None, help="IVF lists probed (default: 1/2/1/4 x default)")
    p.add_argument("--ef-search", type=int, nargs="+", default=None, help="HNSW efSearch values (default 100 200 400)")
    args = p.parse_args(argv)
    import torch

    from stalign.tasks.fast_topk import prepare_bank, recall, search

    device = setup(args)
    cuda = device.type == "cuda"
    n = args.bank or (20_000 if args.quick else 1_000_000 if cuda else 200_000)
    nq = args.queries or (128 if args.quick else 4096 if cuda else 512)
    load_before = load_average()
    bank32 = clustered(n, args.dim, seed=0).to(device)
    queries = clustered(nq, args.dim, seed=1)
    qd = queries.to(device)
    qchunk = 1024 if cuda else 256
    exact_idx = plain_topk(qd, bank32, args.k, query_chunk=qchunk)[1].cpu().numpy()

    rows = []

    def run(name: str, fn) -> None:
        seconds = median_seconds(fn, device, warmup=1, repeat=1 if args.quick else args.repeat)
        idx = fn()[1].cpu().numpy()
        rows.append({"method": name, "queries/s": nq / seconds, "ms per 1,000 queries": seconds / nq * 1e6,
                     "recall@k vs exact": recall(idx, exact_idx)})
        print(rows[-1], flush=True)

    flat = "flat" in args.index
    if flat:
        run("plain fp32 matmul + topk", lambda: plain_topk(qd, bank32, args.k, query_chunk=qchunk))
    faiss_row = None
    if not cuda and flat:
        try:
            import faiss
        except ImportError:
            print("faiss not installed: no peer row (pip install faiss-cpu)")
        else:
            faiss.omp_set_num_threads(torch.get_num_threads())
            index = faiss.IndexFlatIP(args.dim)
            index.add(bank32.numpy())
            qn = queries.numpy()
            run(f"faiss {faiss.__version__} IndexFlatIP", lambda: [torch.from_numpy(a) for a in index.search(qn, args.k)])
            faiss_row = rows[-1]
    if flat and cuda:
        bank16 = bank32.to(torch.bfloat16)
        run("plain bf16 matmul + topk", lambda b=bank16: plain_topk(qd, b, args.k, query_chunk=qchunk))
        del bank16
    default = prepare_bank(bank32, device=device)  # what ReferenceBank.topk uses by default on this device
    label = "bf16 + exact re-scoring" if default.scores.dtype == torch.bfloat16 else "fp32"
    run(f"package default, flat ({label})", lambda b=default: search(queries, b, args.k, query_chunk=qchunk))
    default_dtype = default.scores.dtype
    del default
    if flat:
        for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            if dtype == default_dtype or n >= 1_000_000:
                continue  # the default row; no extra dtypes for huge banks
            bank = prepare_bank(bank32, device=device, dtype=dtype)
            run(f"package {name} bank + exact re-scoring",
                lambda b=bank: search(queries, b, args.k, query_chunk=qchunk))
            del bank
    index_rows(args, bank32.cpu().numpy(), queries, exact_idx, rows, run)
    base = rows[1 if cuda else 0]["queries/s"] if flat else None
    for r in rows:
        if base:
            r["x plain" + (" bf16" if cuda else " fp32")] = r["queries/s"] / base
        if faiss_row is not None:
            r["x faiss"] = r["queries/s"] / faiss_row["queries/s"]
    title = f"retrieval top-{args.k}: {n:,} x {args.dim} bank, {nq:,} queries on {device.type.upper()}"
    notes = [f"bank rows {n:,}, dim {args.dim}, clustered random embeddings, query chunk {qchunk}, "
             f"{torch.get_num_threads()} torch thread(s) (faiss the same)"]
    if not cuda:
        notes.append("CPU figures (no GPU in this run); the 1M-bank targets are for an H100")
    record(args, title=title, device=device, body=table(rows, list(dict.fromkeys(c for r in rows for c in r))), load_before=load_before, notes=notes)


if __name__ == "__main__":
    main()
