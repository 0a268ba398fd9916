"""Reference banks of embeddings with known expression: chunked cosine top-k, zero-shot prediction by
similarity-weighted retrieval, and gene-signature queries (signature -> regions of a slide)."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.models.gene_panel import GenePanelError, check_gene_panel
from stalign.tasks.ann_index import unit_rows
from stofm.util.errors import InputError

BANK_FORMAT = "stalign-reference-bank"


def gene_indices(panel: Sequence[str], genes: Sequence[str], *, what: str = "the model") -> np.ndarray:
    """Positions of ``genes`` in ``panel``; a ``GenePanelError`` lists every gene the panel lacks, or names a gene
    asked for twice (it would give two columns of one name)."""
    twice = sorted(g for g, n in Counter(genes).items() if n > 1)
    if twice:
        raise GenePanelError(f"gene {twice[0]!r} is given twice in the genes asked of {what}"
                             f"{f' (also {twice[1:5]})' if len(twice) > 1 else ''}")
    index = {g: i for i, g in enumerate(panel)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise GenePanelError(f"{len(missing)} of {len(genes)} query genes are not in {what}'s panel of "
                             f"{len(panel)} genes: {', '.join(missing)}")
    return np.asarray([index[g] for g in genes], dtype=np.int64)


class ReferenceBank:
    """Embeddings (N, E) of reference spots with their expression (N, G) over ``genes``.

    ``meta`` holds per-spot arrays of length N (slide_id, barcode, coords, ...) returned with hits; ``info``
    JSON-able settings (crop sizes, source, model) saved with the bank.
    """

    def __init__(self, *, embeddings: Any, expression: Any, genes: Sequence[str],
                 meta: dict[str, Any] | None = None, info: dict[str, Any] | None = None) -> None:
        emb = np.asarray(embeddings, dtype=np.float32)
        expr = np.asarray(expression, dtype=np.float32)
        if emb.ndim != 2 or expr.ndim != 2 or len(emb) != len(expr):
            raise InputError(f"reference bank needs embeddings (N, E) and expression (N, G) with the same N, "
                             f"got {emb.shape} and {expr.shape}")
        if expr.shape[1] != len(genes):
            raise GenePanelError(f"expression has {expr.shape[1]} columns but {len(genes)} genes were given")
        if len(set(genes)) != len(genes):
            raise GenePanelError("the reference gene panel has duplicated gene names")
        self.embeddings, self.expression, self.genes = emb, expr, [str(g) for g in genes]
        self.meta = {k: np.asarray(v) for k, v in (meta or {}).items()}
        for key, value in self.meta.items():
            if len(value) != len(emb):
                raise InputError(f"meta[{key!r}] has {len(value)} rows, the bank has {len(emb)}")
        self.info = dict(info or {})
        self._cache: dict[tuple, Any] = {}
        self._ann: dict[tuple, Any] = {}  # faiss indexes by (kind, build parameters)
        self.path: Path | None = None  # the folder it was saved to / loaded from
        self.sha256: str | None = None  # of that folder's bank.safetensors

    def __len__(self) -> int:
        return len(self.embeddings)

    def __repr__(self) -> str:
        return f"ReferenceBank({len(self)} spots, {self.embeddings.shape[1]}-d, {len(self.genes)} genes)"

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``path/bank.safetensors`` (embeddings, expression) and ``path/bank.json`` (genes, meta)."""
        from safetensors.numpy import save_file

        from stofm.util.safe_files import write_described_tensors

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {k: v.tolist() for k, v in self.meta.items()}
        sha = write_described_tensors(
            path / "bank.json", path / "bank.safetensors",
            lambda f: save_file({"embeddings": self.embeddings, "expression": self.expression}, str(f)),
            {"format": BANK_FORMAT, "version": 1, "genes": self.genes, "meta": meta, "info": self.info})
        for desc in path.glob("index-*.json"):  # cached faiss indexes of earlier contents of this folder
            try:
                stale = json.loads(desc.read_text()).get("bank_sha256") != sha
            except ValueError:
                stale = True
            if stale:
                desc.with_suffix(".faiss").unlink(missing_ok=True)
                desc.unlink(missing_ok=True)
        self.path, self.sha256 = path, sha
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReferenceBank:
        """Read a bank written by ``save`` (damaged files, NaN/inf values or a changed checksum are refused)."""
        from stofm.util.safe_files import read_described_tensors

        path, tensors = Path(path), Path(path) / "bank.safetensors"
        info, arrays = read_described_tensors(path, "bank.json", tensors.name, fmt=BANK_FORMAT, what="reference bank",
                                              framework="np")
        if set(arrays) != {"embeddings", "expression"}:
            raise InputError(f"{tensors}: a reference bank holds 'embeddings' and 'expression', not {sorted(arrays)}")
        bank = cls(embeddings=arrays["embeddings"], expression=arrays["expression"], genes=info["genes"],
                   meta=info.get("meta") or {}, info=info.get("info") or {})
        bank.path, bank.sha256 = path, info.get("sha256")
        return bank

    # ---------------------------------------------------------------- gene panels
    def check_genes(self, genes: Sequence[str], *, what: str = "the model") -> None:
        """Raise ``GenePanelError`` unless the bank's panel is ``genes`` (e.g. the model's panel)."""
        check_gene_panel(genes, self.genes, what=f"the reference bank (for {what})")

    def check_model(self, model: Any) -> None:
        """``InputError`` when the bank was embedded by other weights than ``model``'s (the ``weights_sha256`` both
        record): another model's gene embeddings live in another space. A bank or model without the checksum
        (built before it was recorded, a model not loaded from a folder) is not checked."""
        mine = (getattr(model, "meta", None) or {}).get("weights_sha256")
        theirs = self.info.get("model_weights_sha256")
        if mine and theirs and mine != theirs:
            where = self.path or self.info.get("source", "the reference bank")
            raise InputError(f"{where}: the reference bank was embedded by model {self.info.get('model')!r} with "
                             f"weights sha256 {theirs[:12]}..., not this model's ({mine[:12]}...); build it with this "
                             "model (stalign retrieve bank --model ...) or pass the shards folder as --reference")

    def gene_indices(self, genes: Sequence[str]) -> np.ndarray:
        """Columns of ``genes`` in the bank; errors list the genes the bank lacks."""
        return gene_indices(self.genes, genes, what="the reference bank")

    # ---------------------------------------------------------------- search
    def _bank_tensor(self, device: str, dtype: Any):
        from stalign.tasks.fast_topk import prepare_bank

        key = (str(device), str(dtype))
        if key not in self._cache:
            self._cache = {key: prepare_bank(self.embeddings, device=device, dtype=dtype)}  # keep one copy only
        return self._cache[key]

    def ann_index(self, kind: str, params: dict[str, int] | None = None, *, progress: bool = False) -> Any:
        """The faiss ``AnnIndex`` (``kind`` "ivf" or "hnsw") of this bank: built once, cached beside a saved bank
        (``index-<kind>-<parameters>.faiss`` + ``.json`` with the bank's sha256; a cache built for other contents
        is refused with ``IndexMismatchError``) and kept in memory. Search parameters (``nprobe``, ``ef_search``)
        in ``params`` apply to this and later searches."""
        from stalign.tasks.ann_index import BUILD_KEYS, build_index, default_params, load_index, save_index

        params = {**default_params(kind, len(self)), **(params or {})}
        key = (kind, tuple(params[k] for k in BUILD_KEYS[kind]))
        if key not in self._ann:
            ann = None
            if self.path is not None and self.sha256:
                ann = load_index(self.path, kind, params, bank_sha256=self.sha256, n_rows=len(self))
            if ann is None:
                ann = build_index(self.embeddings, kind, params, progress=progress)
                if self.path is not None and self.sha256:
                    try:
                        save_index(ann, self.path, bank_sha256=self.sha256, n_rows=len(self))
                    except OSError:  # a read-only bank folder: the index still serves this process
                        pass
            self._ann[key] = ann
        self._ann[key].params.update(params)
        return self._ann[key]

    def topk(self, queries: Any, k: int, *, chunk: int = 65536, query_chunk: int = 1024,
             device: str | None = None, dtype: Any = None, index: str = "auto",
             index_params: dict[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine top-``k`` of ``queries`` (Q, E) against the bank: (similarities (Q, k), indices (Q, k)).

        ``index``: "flat" (exact brute force), "ivf" / "hnsw" (faiss, ``ann_index``; candidates re-scored exactly,
        so similarities are exact and only recall depends on the index), "auto" (IVF for banks of at least
        ``stalign.tasks.ann_index.AUTO_FAISS_MIN_ROWS`` rows when faiss is installed, else flat).
        Flat search: memory stays bounded by ``query_chunk`` x ``chunk`` similarities; ``dtype`` (default: bf16 on
        a GPU and on CPUs with native bf16 for large banks, float32 otherwise) stores the bank in lower precision,
        candidates are re-scored exactly in float32 (``stalign.tasks.fast_topk``).
        """
        import torch

        from stalign.tasks.ann_index import ann_search, choose_index

        q = torch.as_tensor(np.asarray(queries, dtype=np.float32))
        if q.ndim != 2 or q.shape[1] != self.embeddings.shape[1]:
            raise InputError(f"queries must be (Q, {self.embeddings.shape[1]}), got {tuple(q.shape)}")
        if not 1 <= k <= len(self):
            raise InputError(f"k must lie in 1..{len(self)} (the bank size), got {k}")
        from stalign.models.perf import resolve_device
        from stalign.tasks.fast_topk import search, search_dtype

        device = resolve_device(device)

        def flat(qs: Any):
            bank = self._bank_tensor(device, search_dtype(device, dtype, n_rows=len(self)))
            return search(torch.as_tensor(qs), bank, k, chunk=chunk, query_chunk=query_chunk)

        kind = choose_index(index, len(self))
        if kind == "flat":
            sims, idx = flat(q)
        else:
            sims, idx = ann_search(q, self.embeddings, self.ann_index(kind, index_params), k,
                                   exact_fallback=lambda qs: [t.cpu() for t in flat(qs)])
        return sims.cpu().numpy(), idx.cpu().numpy()

    def predict(self, queries: Any, *, k: int = 50, temperature: float = 0.05, genes: Sequence[str] | None = None,
                **search: Any) -> np.ndarray:
        """Zero-shot expression (Q, G): softmax(top-k similarity / temperature)-weighted mean of the
        reference expression (only ``genes``, in that order, when given)."""
        if temperature <= 0:
            raise InputError(f"temperature must be > 0, got {temperature}")
        sims, idx = self.topk(queries, min(k, len(self)), **search)
        weights = np.exp((sims - sims.max(axis=1, keepdims=True)) / temperature)
        weights /= weights.sum(axis=1, keepdims=True)
        expr = self.expression if genes is None else self.expression[:, self.gene_indices(genes)]
        out = np.empty((len(idx), expr.shape[1]), dtype=np.float32)
        step = max(1, 2**26 // max(1, idx.shape[1] * expr.shape[1]))  # bounds the (q, k, G) gather to ~256 MB
        for s in range(0, len(idx), step):
            out[s:s + step] = np.einsum("qk,qkg->qg", weights[s:s + step], expr[idx[s:s + step]])
        return out

    def hits(self, queries: Any, *, k: int = 10, **search: Any):
        """Table (pandas) of the ``k`` most similar reference spots per query, with their meta columns."""
        import pandas as pd

        sims, idx = self.topk(queries, k, **search)
        q, rank = np.meshgrid(np.arange(len(sims)), np.arange(sims.shape[1]), indexing="ij")
        table = pd.DataFrame({"query": q.ravel(), "rank": rank.ravel() + 1, "index": idx.ravel(),
                              "similarity": sims.ravel()})
        for key, values in self.meta.items():
            if values.ndim == 1:
                table[key] = values[idx.ravel()]
        return table


def signature_scores(signature: Sequence[str] | Any, expression: np.ndarray, genes: Sequence[str]) -> np.ndarray:
    """How strongly each row of ``expression`` (N, G over ``genes``) carries ``signature``.

    A list of gene names scores the mean z-scored expression of those genes; an expression vector (G,) over
    ``genes`` scores the Pearson correlation of each row with it, both taken relative to the mean profile of
    ``expression`` (so what is shared by every spot does not dominate).
    """
    expression = np.asarray(expression, dtype=np.float64)
    if len(signature) and isinstance(next(iter(signature)), str):
        cols = gene_indices(genes, list(signature), what="the reference")
        sub = expression[:, cols]
        z = (sub - sub.mean(0)) / np.where(sub.std(0) > 0, sub.std(0), 1.0)
        return z.mean(1)
    vec = np.asarray(signature, dtype=np.float64).ravel()
    if len(vec) != len(genes):
        raise GenePanelError(f"the signature vector has {len(vec)} values but the reference panel has "
                             f"{len(genes)} genes; give it over the same genes, in the same order")
    centre = expression.mean(0)
    a = expression - centre
    a -= a.mean(1, keepdims=True)
    b = vec - centre
    b -= b.mean()
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b)
    return np.divide(a @ b, denom, out=np.zeros(len(a)), where=denom > 0)


def query_signature(signature: Sequence[str] | Any, *, bank: ReferenceBank, embeddings: Any, top: int = 25,
                    encode_gene: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Gene signature -> region scores (N,) over a slide whose spot image embeddings are ``embeddings``.

    The query embedding is the mean of the ``top`` bank embeddings that best carry the signature, or, for an
    expression vector and a model, ``encode_gene(vector)``; regions score by cosine similarity to it.
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[1] != bank.embeddings.shape[1]:
        raise InputError(f"slide embeddings must be (N, {bank.embeddings.shape[1]}), got {emb.shape}")
    scores = signature_scores(signature, bank.expression, bank.genes)
    is_vector = not (len(signature) and isinstance(next(iter(signature)), str))
    if encode_gene is not None and is_vector:
        query = np.asarray(encode_gene(np.asarray(signature, dtype=np.float32)[None]), dtype=np.float32)[0]
    else:
        best = np.argsort(-scores)[: max(1, min(top, len(bank)))]
        query = unit_rows(bank.embeddings[best]).mean(0)
    query = query / max(float(np.linalg.norm(query)), 1e-12)
    return unit_rows(emb) @ query
