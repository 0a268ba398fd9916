"""Geneformer rank-value tokens: a cell becomes its expressed genes, sorted by normalised expression.

Score of gene g in a cell = (counts_g / total × 1e4) / median_g, where median_g is the median of the
non-zero normalised values of g over a reference set of cells (``fit_medians``). Non-zero genes are
sorted by score, descending, ties broken by token id (so the column order of the input does not
matter), truncated at ``max_len``, and ``<cls>`` is prepended. Dividing by the cell's total does not
change the order inside a cell, so tokenisation skips it (``fit_medians`` does not).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

from stofm.util.errors import StofmError
from stofm.vocab import GeneVocab

if TYPE_CHECKING:
    import torch

InputKind = Literal["counts", "log1p"]
TARGET_SUM = 1e4


class TokenizeError(StofmError, ValueError):
    """Expression input that cannot be tokenised."""


def check_input_kind(input_kind: str) -> None:
    """Refuse an expression kind other than ``"counts"`` or ``"log1p"`` (tokenizers and cell encoders)."""
    if input_kind not in ("counts", "log1p"):
        raise TokenizeError(f"input_kind must be 'counts' or 'log1p', got {input_kind!r}")


def _dense_rows(X, start: int, stop: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Rows ``start:stop`` (of ``rows`` when given) of a dense, scipy-sparse or backed matrix, as float64."""
    import scipy.sparse as sp

    block = X[start:stop] if rows is None else X[rows[start:stop]]
    block = block.toarray() if sp.issparse(block) else np.asarray(block)
    block = block.astype(np.float64, copy=False)
    where = f"expression rows {start}..{start + len(block) - 1}" + ("" if rows is None else " of the sample")
    if not np.isfinite(block).all():
        raise TokenizeError(f"{where} contain NaN or infinite values")
    if (block < 0).any():
        raise TokenizeError(f"{where} contain negative values; pass raw counts or log1p-normalised values")
    return block


def _to_normalised(block: np.ndarray, input_kind: str, *, per_total: bool) -> np.ndarray:
    if input_kind == "log1p":
        return np.expm1(block)
    if not per_total:
        return block
    total = block.sum(axis=1, keepdims=True)
    return np.divide(block * TARGET_SUM, total, out=np.zeros_like(block), where=total > 0)


def fit_medians(X, genes: Sequence[str], *, input: InputKind = "counts", max_cells: int | None = 200_000,
                batch_size: int = 4096, seed: int = 0, progress: bool = False) -> dict[str, float]:
    """Per-gene median of the non-zero normalised values (counts/total × 1e4), as in Geneformer.

    ``X`` is (cells, genes) counts (dense, scipy sparse, backed, or log1p-normalised with ``input="log1p"``).
    Above ``max_cells`` cells, a seeded random sample of that many is used (the non-zero values are
    kept in memory to take exact medians). Genes never expressed are left out of the result.
    """
    import scipy.sparse as sp
    from tqdm.auto import tqdm

    check_input_kind(input)
    n_cells, n_genes = X.shape
    if n_genes != len(genes):
        raise TokenizeError(f"X has {n_genes} columns but {len(genes)} genes were given")
    rows = None
    if max_cells is not None and n_cells > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n_cells, size=max_cells, replace=False))
        n_cells = max_cells
    columns: list[list[np.ndarray]] = [[] for _ in range(n_genes)]
    for start in tqdm(range(0, n_cells, batch_size), desc="gene medians", disable=not progress):
        block = _to_normalised(_dense_rows(X, start, start + batch_size, rows), input, per_total=True)
        block = sp.csc_matrix(block.astype(np.float32))
        for j in np.flatnonzero(np.diff(block.indptr)):
            columns[j].append(block.data[block.indptr[j]:block.indptr[j + 1]])
    return {str(genes[j]): float(np.median(np.concatenate(vals))) for j, vals in enumerate(columns) if vals}


def medians_for(genes: Sequence[str], gene_medians: Mapping[str, float] | np.ndarray | Sequence[float]
                ) -> np.ndarray:
    """Medians aligned to ``genes`` (NaN where unknown); accepts a {gene: median} dict or an array over ``genes``."""
    if isinstance(gene_medians, Mapping):
        return np.array([gene_medians.get(str(g), np.nan) for g in genes], dtype=np.float64)
    med = np.asarray(gene_medians, dtype=np.float64)
    if med.shape != (len(genes),):
        raise TokenizeError(f"gene_medians has shape {med.shape}, expected ({len(genes)},) to match the genes")
    return med


def rank_tokens(expr: torch.Tensor, gene_ids: torch.Tensor, medians: torch.Tensor, max_len: int, *,
                input_kind: InputKind = "counts", cls_id: int = GeneVocab.cls_id, pad_id: int = GeneVocab.pad_id
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-value tokens of an expression tensor, in torch (runs where ``expr`` lives).

    ``expr`` (B, G); ``gene_ids`` (G,) token ids, < 0 for genes to leave out; ``medians`` (G,) with
    non-positive/NaN entries left out too. Returns ids (B, L) and pad_mask (B, L) (True = padding),
    L = 1 + min(max_len, most expressed genes in the batch). Ties break by token id: ``topk`` runs on
    unique integer keys (score bits, then token id), so it is exact and deterministic.
    """
    import torch

    check_input_kind(input_kind)
    if expr.ndim != 2 or expr.shape[1] != gene_ids.shape[0]:
        raise TokenizeError(f"expr must be (B, {gene_ids.shape[0]}), got {tuple(expr.shape)}")
    expr = expr.float()
    if input_kind == "log1p":
        expr = torch.expm1(expr)
    usable = (gene_ids >= 0) & torch.isfinite(medians) & (medians > 0)
    keep = (expr > 0) & usable
    score = (expr / torch.where(usable, medians, 1.0).float()).contiguous()
    # unique int64 keys: the score's float32 bits (monotone for positive floats), then a tie-break that
    # falls with the token id, so topk is exact and deterministic: score descending, then token id ascending
    by_id = torch.argsort(torch.where(usable, gene_ids, gene_ids.max() + 1), stable=True)
    tie = torch.empty_like(by_id).scatter_(0, by_id, torch.arange(len(by_id) - 1, -1, -1, device=by_id.device))
    key = ((score.view(torch.int32).long() << 32) | tie).masked_fill_(~keep, -1)
    n_keep = keep.sum(dim=1).clamp(max=max_len)
    length = int(n_keep.max()) if n_keep.numel() else 0
    ids = gene_ids[torch.topk(key, length, dim=1, sorted=True).indices]
    pad = torch.arange(length, device=expr.device)[None, :] >= n_keep[:, None]
    ids = torch.where(pad, torch.full_like(ids, pad_id), ids)
    cls = torch.full((expr.shape[0], 1), cls_id, dtype=ids.dtype, device=ids.device)
    pad = torch.cat([torch.zeros_like(cls, dtype=torch.bool), pad], dim=1)
    return torch.cat([cls, ids], dim=1).long(), pad


class RankValueTokenizer:
    """Counts (or log1p values) of cells -> rank-value token ids with ``<cls>`` first, padded."""

    def __init__(self, *, vocab: GeneVocab, gene_medians: Mapping[str, float] | np.ndarray | None = None,
                 max_len: int = 2048) -> None:
        if max_len < 1:
            raise TokenizeError(f"max_len must be >= 1, got {max_len}")
        self.vocab = vocab
        self.max_len = int(max_len)
        if gene_medians is None:  # pure rank of normalised values
            gene_medians = {g: 1.0 for g in vocab.genes}
        elif not isinstance(gene_medians, Mapping):
            gene_medians = dict(zip(vocab.genes, medians_for(vocab.genes, gene_medians).tolist()))
        self.gene_medians: dict[str, float] = {str(k): float(v) for k, v in gene_medians.items()}
        self._tables: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def fit(cls, X, genes: Sequence[str], *, vocab: GeneVocab | None = None, max_len: int = 2048,
            input: InputKind = "counts") -> RankValueTokenizer:
        """A tokenizer with medians fitted on ``X`` (vocabulary built from ``genes`` unless given)."""
        vocab = vocab or GeneVocab.from_genes(genes)
        return cls(vocab=vocab, gene_medians=fit_medians(X, genes, input=input), max_len=max_len)

    def gene_table(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids (-1 where unusable) and medians of ``genes``; warns (once per gene list) about genes left out."""
        key = tuple(str(g) for g in genes)
        if key not in self._tables:
            self._tables = {key: self._gene_table(genes)}  # keep one: the last gene list
        return self._tables[key]

    def _gene_table(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids = self.vocab.encode(genes).copy()
        med = medians_for(genes, self.gene_medians)
        no_median = (ids != self.vocab.unk_id) & ~(np.isfinite(med) & (med > 0))
        if no_median.any():
            examples = [str(genes[i]) for i in np.flatnonzero(no_median)[:5]]
            warnings.warn(f"{int(no_median.sum())} of {len(genes)} genes have no median and are left out "
                          f"of the tokens (e.g. {examples})", UserWarning, stacklevel=4)
        ids[(ids == self.vocab.unk_id) | no_median] = -1
        uniq, counts = np.unique(ids[ids >= 0], return_counts=True)
        if (counts > 1).any():
            warnings.warn(f"{int((counts > 1).sum())} genes occur in more than one column (e.g. "
                          f"{self.vocab.decode(uniq[counts > 1][:5])}); their tokens repeat", UserWarning,
                          stacklevel=4)
        return ids, np.where(ids >= 0, med, np.nan)

    def __call__(self, X, genes: Sequence[str], *, input: InputKind = "counts", batch_size: int = 1024,
                 progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (N, L) and padding mask (N, L), True = padding; X dense, scipy sparse or backed."""
        import torch
        from tqdm.auto import tqdm

        check_input_kind(input)
        if len(X.shape) != 2 or X.shape[1] != len(genes):
            raise TokenizeError(f"X has shape {tuple(X.shape)} but {len(genes)} genes were given")
        ids, med = self.gene_table(genes)
        gene_ids, medians = torch.from_numpy(ids), torch.from_numpy(med).float()
        parts = []
        for start in tqdm(range(0, X.shape[0], batch_size), desc="tokenize", disable=not progress):
            block = torch.from_numpy(_dense_rows(X, start, start + batch_size).astype(np.float32))
            parts.append(rank_tokens(block, gene_ids, medians, self.max_len, input_kind=input,
                                     cls_id=self.vocab.cls_id, pad_id=self.vocab.pad_id))
        return _pad_cat(parts, self.vocab.pad_id)


def _pad_cat(parts: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    import torch.nn.functional as F

    if not parts:
        return torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bool)
    width = max(p[0].shape[1] for p in parts)
    ids = torch.cat([F.pad(i, (0, width - i.shape[1]), value=pad_id) for i, _ in parts])
    mask = torch.cat([F.pad(m, (0, width - m.shape[1]), value=True) for _, m in parts])
    return ids, mask
