"""faiss indexes for reference banks too large for brute force (millions of spots): IVF (``IndexIVFFlat``) or HNSW
(``IndexHNSWFlat``) over the L2-normalised embeddings (inner product = cosine), built once and cached beside a
saved bank with the bank's sha256 and the index parameters recorded (a cache built for other contents is
refused). Searches return ``k + margin`` candidates per query that are re-scored exactly in float32, so the
returned similarities are exact; only recall depends on the index (measured in benchmarks/RESULTS.md).

faiss is an optional extra: ``pip install 'stalign[faiss]'``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError, MissingDependencyError
from stofm.util.output_paths import atomic_write_path
from stofm.util.safe_files import sha256_of

INDEX_KINDS = ("auto", "flat", "ivf", "hnsw")
#: ``index="auto"`` uses IVF for banks of at least this many rows when faiss is installed (exact brute force
#: below). At 1M x 256 on a 2-core CPU brute force answers ~55 queries/s, IVF (nprobe 64) ~340 at recall 1.0
#: (benchmarks/RESULTS.md): a 100,000-tile slide then takes minutes instead of half an hour.
AUTO_FAISS_MIN_ROWS = 1_000_000
INDEX_FORMAT = "stalign-faiss-index"
_CHUNK = 262_144  # rows normalised and added at a time (bounded extra memory)


class FaissMissingError(MissingDependencyError, RuntimeError):
    """An IVF/HNSW index was asked for but faiss is not installed."""


class IndexMismatchError(InputError):
    """A cached index was built for other bank contents or parameters."""


def import_faiss(kind: str = "ivf") -> Any:
    """The ``faiss`` module, or ``FaissMissingError`` saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise FaissMissingError(f"index '{kind}' needs faiss, which is not installed: pip install 'stalign[faiss]' "
                                f"(or use index 'flat', exact brute force)") from None
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except FaissMissingError:
        return False
    return True


def choose_index(kind: str, n_rows: int) -> str:
    """``flat``, ``ivf`` or ``hnsw`` for ``kind``: ``auto`` = IVF for banks of >= ``AUTO_FAISS_MIN_ROWS`` rows when
    faiss is installed, else flat (exact brute force)."""
    if kind not in INDEX_KINDS:
        raise InputError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
    if kind == "auto":
        return "ivf" if n_rows >= AUTO_FAISS_MIN_ROWS and faiss_available() else "flat"
    return kind


def default_params(kind: str, n_rows: int) -> dict[str, int]:
    """Build/search parameters: IVF ``nlist`` = the power of two nearest 4·sqrt(N) (>= 1, <= N / 39, faiss's
    minimum training points per list), ``nprobe`` = nlist / 64, at least 32 (recall 1.0 on the clustered 1M bank of
    benchmarks/retrieval.py from nprobe 32, at 6x brute force's speed for nprobe 64); HNSW ``M`` 32, ``ef_construction`` 80,
    ``ef_search`` 128 (raised to the candidate count at search time)."""
    if kind == "ivf":
        nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n_rows))))
        nlist = int(max(1, min(nlist, n_rows // 39 or 1)))
        return {"nlist": nlist, "nprobe": int(min(nlist, max(32, nlist // 64)))}
    if kind == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    raise ValueError(f"no faiss parameters for index {kind!r}")


BUILD_KEYS = {"ivf": ("nlist",), "hnsw": ("M", "ef_construction")}


def unit_rows(x: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """The rows of ``x`` L2-normalised, as ``dtype`` (a zero row stays zero)."""
    x = np.asarray(x, dtype=dtype)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class AnnIndex:
    """A faiss index over the unit-normalised rows of a bank, with its kind and parameters."""

    kind: str
    params: dict[str, int]
    index: Any = field(repr=False)

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) of the ``n`` best candidates of each unit query (rows -1 where fewer were found)."""
        faiss = import_faiss(self.kind)
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])
        else:
            self.index.hnsw.efSearch = int(max(self.params["ef_search"], n))
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), int(n))


def build_index(embeddings: Any, kind: str, params: dict[str, int] | None = None, *, seed: int = 0,
                progress: bool = False) -> AnnIndex:
    """An IVF or HNSW ``AnnIndex`` of ``embeddings`` (N, E) (normalised chunk by chunk; IVF trained on a seeded
    sample of at most 40·nlist rows, 10 k-means rounds)."""
    from tqdm import tqdm

    faiss = import_faiss(kind)
    emb = np.asarray(embeddings)
    n, dim = emb.shape
    params = {**default_params(kind, n), **(params or {})}
    if kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, 40 * int(params["nlist"])), replace=False))
        index.cp.seed, index.cp.niter = seed, 10  # k-means centres only route queries: 10 rounds suffice
        index.train(unit_rows(emb[sample]))  # faiss's wrapper keeps ``quantizer`` alive with the index
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = int(params["ef_construction"])
    else:
        raise ValueError(f"build_index makes 'ivf' or 'hnsw' indexes, not {kind!r}")
    for s in tqdm(range(0, n, _CHUNK), desc=f"building {kind} index", unit="chunk", disable=not progress):
        index.add(unit_rows(emb[s:s + _CHUNK]))
    return AnnIndex(kind=kind, params={k: int(v) for k, v in params.items()}, index=index)


def index_files(folder: str | Path, kind: str, params: dict[str, int]) -> tuple[Path, Path]:
    """(index file, description JSON) of a cached index in a bank folder; the name holds the build parameters."""
    tag = "-".join(f"{k}{params[k]}" for k in BUILD_KEYS[kind])
    stem = Path(folder) / f"index-{kind}-{tag}"
    return stem.with_suffix(".faiss"), stem.with_suffix(".json")


def save_index(ann: AnnIndex, folder: str | Path, *, bank_sha256: str, n_rows: int) -> Path:
    """Write the index beside the bank with its kind, parameters, its own sha256 (checked on load, for every kind:
    HNSW holds its vectors unchecked by faiss), the bank's sha256 and size, faiss's version."""
    faiss = import_faiss(ann.kind)
    path, desc = index_files(folder, ann.kind, ann.params)
    with atomic_write_path(path) as tmp:
        faiss.write_index(ann.index, str(tmp))
        digest = sha256_of(tmp)
    with atomic_write_path(desc) as tmp:
        tmp.write_text(json.dumps({"format": INDEX_FORMAT, "version": 1, "kind": ann.kind, "params": ann.params,
                                   "bank_sha256": bank_sha256, "n_rows": int(n_rows), "metric": "inner_product",
                                   "normalised": True, "faiss_version": faiss.__version__, "sha256": digest}))
    return path


def load_index(folder: str | Path, kind: str, params: dict[str, int], *, bank_sha256: str,
               n_rows: int) -> AnnIndex | None:
    """The cached index of ``kind``/``params`` beside a bank, None when there is none; ``IndexMismatchError`` when
    it was built for other bank contents (sha256, size) or parameters."""
    faiss = import_faiss(kind)
    path, desc = index_files(folder, kind, params)
    if not path.is_file() or not desc.is_file():
        return None
    try:
        info = json.loads(desc.read_text())
    except ValueError as err:
        raise IndexMismatchError(f"{desc}: not a readable index description ({err})") from None
    built = {k: int(params[k]) for k in BUILD_KEYS[kind]}
    if info.get("format") != INDEX_FORMAT or info.get("kind") != kind:
        raise IndexMismatchError(f"{desc}: not a stalign {kind} index description")
    if info.get("bank_sha256") != bank_sha256 or info.get("n_rows") != n_rows:
        raise IndexMismatchError(f"{path}: built for another bank (sha256 {str(info.get('bank_sha256'))[:12]}..., "
                                 f"{info.get('n_rows')} rows; this bank {bank_sha256[:12]}..., {n_rows} rows); "
                                 f"delete it to rebuild")
    if {k: info.get("params", {}).get(k) for k in built} != built:
        raise IndexMismatchError(f"{path}: built with {info.get('params')}, not {built}")
    digest = sha256_of(path)
    if digest != info.get("sha256"):
        said = f"differs from the {str(info['sha256'])[:12]}... recorded" if info.get("sha256") else \
            "cannot be checked (no sha256 recorded: an index cached by an older stalign)"
        raise IndexMismatchError(f"{path}: the index is damaged or unverified (sha256 {digest[:12]}... {said}); "
                                 "delete it to rebuild")
    index = faiss.read_index(str(path))
    if index.ntotal != n_rows:
        raise IndexMismatchError(f"{path}: holds {index.ntotal} vectors, the bank {n_rows}")
    return AnnIndex(kind=kind, params={**info["params"], **params}, index=index)


def ann_search(queries: Any, embeddings: np.ndarray, ann: AnnIndex, k: int, *, margin: int | None = None,
               exact_fallback: Any = None):
    """Cosine top-``k`` through ``ann``: ``k + margin`` candidates (default margin k) re-scored exactly in float32
    against ``embeddings``; (similarities float32 (Q, k), indices int64 (Q, k)) as torch tensors. Queries for
    which the index found fewer than ``k`` candidates are answered by ``exact_fallback(queries)`` (brute force)."""
    import torch

    n = len(embeddings)
    kk = min(n, k + (k if margin is None else margin))
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, np.float32)), dim=1)
    _, rows = ann.search(q.numpy(), kk)
    rows = torch.from_numpy(rows.astype(np.int64))
    valid = rows >= 0
    cand = torch.nn.functional.normalize(torch.from_numpy(np.asarray(embeddings[rows.clamp(min=0).numpy()],
                                                                     np.float32)), dim=2)
    exact = torch.einsum("qe,qke->qk", q, cand).masked_fill(~valid, float("-inf"))
    sims, pos = exact.topk(k, dim=1)
    idx = rows.gather(1, pos)
    short = torch.nonzero(valid.sum(1) < k).flatten()
    if len(short):
        if exact_fallback is None:
            raise ValueError(f"the {ann.kind} index found fewer than {k} candidates for {len(short)} queries")
        fs, fi = exact_fallback(q[short])
        sims[short], idx[short] = torch.as_tensor(fs, dtype=sims.dtype), torch.as_tensor(fi, dtype=idx.dtype)
    return sims, idx
