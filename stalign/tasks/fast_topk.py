"""Fast cosine top-k over large reference banks (used by ``ReferenceBank.topk``).

Per (query chunk, bank chunk) the scores ``q @ bank.T`` are computed in the bank's storage dtype (bf16/fp16
on a GPU: tensor cores, half the bytes) and reduced without a full-width ``topk``: the chunk's columns form
groups of ``group``; the k groups with the largest maxima contain the chunk's exact top-k (any group holding
one of the top-k values has a maximum at least the k-th value, and at most k groups do), so only
k x ``group`` candidates reach ``topk``. Each chunk's ``k + margin`` best are merged, and, when the bank is
stored in low precision, re-scored exactly in float32 against a float32 copy of the bank: the returned
similarities are exact, and an index is missed only when low-precision rounding pushed it below
``k + margin`` candidates (recall of the exact top-k >= 0.99, measured in ``tests/test_perf.py`` and
``benchmarks/retrieval.py``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from stofm.util.errors import InputError

#: On a CPU with native bf16 matmuls, banks of at least this many rows are searched in bf16 (with exact fp32
#: re-scoring); smaller banks stay fp32 (the matmul is not what takes the time there).
CPU_BF16_MIN_ROWS = 50_000


@dataclass
class DeviceBank:
    """L2-normalised bank on a device: ``scores`` (N, E) in the search dtype, ``exact`` float32 (or None)."""

    scores: Any
    exact: Any = None

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX; ``STALIGN_CPU_BF16=0/1`` overrides)."""
    forced = os.environ.get("STALIGN_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def search_dtype(device: Any, dtype: Any = None, n_rows: int | None = None):
    """``dtype`` when given; else bf16 on CUDA, and on a CPU with native bf16 matmuls for banks of at least
    ``CPU_BF16_MIN_ROWS`` rows (measured 1.36x faiss ``IndexFlatIP`` on 2 cores, benchmarks/RESULTS.md); fp32
    otherwise. Returned scores are exact fp32 either way (re-scoring)."""
    import torch

    if dtype is not None:
        return dtype
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    big = n_rows is None or n_rows >= CPU_BF16_MIN_ROWS
    return torch.bfloat16 if big and cpu_has_fast_bf16() else torch.float32


def prepare_bank(embeddings: Any, *, device: Any = "cpu", dtype: Any = None, rescore: bool = True) -> DeviceBank:
    """Normalise ``embeddings`` (N, E) and place them on ``device`` in the search dtype (plus an exact
    float32 copy for re-scoring when that dtype is lower precision and ``rescore``)."""
    import numpy as np
    import torch

    dtype = search_dtype(device, dtype, n_rows=len(embeddings))
    emb = torch.as_tensor(np.asarray(embeddings, dtype=np.float32) if not torch.is_tensor(embeddings) else embeddings)
    unit = torch.nn.functional.normalize(emb.float(), dim=1).to(device)
    low = dtype != torch.float32
    return DeviceBank(scores=unit.to(dtype) if low else unit, exact=unit if (low and rescore) else None)


def _chunk_topk(s: Any, k: int, group: int):
    """Exact top-``k`` (values, column indices) of each row of ``s`` via group maxima."""
    import torch
    from einops import rearrange

    n = s.shape[1]
    if group <= 1 or n <= 4 * k * group:
        return s.topk(k, dim=1)
    if n % group:
        s = torch.nn.functional.pad(s, (0, group - n % group), value=float("-inf"))
    grouped = rearrange(s, "q (m g) -> q m g", g=group)
    top_groups = grouped.amax(dim=2).topk(k, dim=1).indices  # (q, k)
    cand = grouped.gather(1, top_groups[:, :, None].expand(-1, -1, group))  # (q, k, g)
    cols = top_groups[:, :, None] * group + torch.arange(group, device=s.device)
    vals, pos = rearrange(cand, "q k g -> q (k g)").topk(k, dim=1)
    return vals, rearrange(cols, "q k g -> q (k g)").gather(1, pos)


def _bf16_topk(s: Any, k: int, group: int = 64):
    """Top-``k`` of bf16 scores through their int16 bit patterns (same order for non-negative floats, and integer
    reductions vectorise on the CPU): the maxima of groups of ``group`` columns pick the k groups that hold the
    top-k (as ``_chunk_topk``), then ``topk`` runs over their k x ``group`` columns only. Rows whose k-th value is
    negative (bits order negatives backwards) are redone in float."""
    import torch

    bits = s.view(torch.int16)
    rows, n = bits.shape
    if group > 1 and n % group == 0 and n >= 4 * k * group:
        grouped = bits.view(rows, n // group, group)
        top_groups = grouped.amax(dim=2).topk(k, dim=1, sorted=False).indices  # (q, k)
        cand = grouped[torch.arange(rows)[:, None], top_groups].view(rows, k * group)  # (faster than gather here)
        v, pos = cand.topk(k, dim=1, sorted=False)
        cols = (top_groups[:, :, None] * group + torch.arange(group)).view(rows, k * group)
        i = cols.gather(1, pos)
    else:
        v, i = bits.topk(k, dim=1, sorted=False)
    v = v.view(torch.bfloat16)
    bad = torch.nonzero(v.amin(dim=1) < 0).flatten()
    if len(bad):
        fv, fi = s[bad].float().topk(k, dim=1, sorted=False)
        v[bad], i[bad] = fv.to(v.dtype), fi
    return v, i


def search(queries: Any, bank: DeviceBank, k: int, *, chunk: int = 65536, query_chunk: int = 1024,
           group: int | None = None, margin: int | None = None):
    """Cosine top-``k`` of ``queries`` (Q, E) in ``bank``: (similarities float32 (Q, k), indices int64 (Q, k)),
    on the bank's device. ``margin`` extra candidates per query are re-scored exactly (default: k, capped by N).
    ``group``: columns per group of the group-max reduction (default 16 on CUDA, where a full-width ``topk`` is
    slow; off on the CPU, where ``topk`` costs less than the strided maximum)."""
    import torch

    n = len(bank)
    if not 1 <= k <= n:
        raise InputError(f"k must lie in 1..{n} (the bank size), got {k}")
    device, dtype = bank.scores.device, bank.scores.dtype
    rescoring = bank.exact is not None
    group = (16 if device.type == "cuda" else 0) if group is None else group
    kk = min(n, k + (k if margin is None else margin)) if rescoring else k
    # without native half matmuls the CPU stores half precision but scores in fp32
    upcast = device.type == "cpu" and dtype != torch.float32 and not (dtype == torch.bfloat16 and cpu_has_fast_bf16())
    q_all = torch.nn.functional.normalize(torch.as_tensor(queries).float(), dim=1)
    cpu_bf16 = device.type == "cpu" and dtype == torch.bfloat16 and not upcast
    buf = torch.empty(min(query_chunk, len(q_all)), min(chunk, n), dtype=dtype) if cpu_bf16 else None
    sims_out, idx_out = [], []
    for qs in range(0, len(q_all), query_chunk):
        q32 = q_all[qs:qs + query_chunk].to(device)
        q = q32 if upcast else q32.to(dtype)
        vals, idxs = [], []
        for bs in range(0, n, chunk):
            part = bank.scores[bs:bs + chunk]
            if cpu_bf16:  # scores into one reused buffer (no page faults), top-k on their int16 bit patterns
                s = buf[: len(q), : len(part)]
                torch.mm(q, part.T, out=s)
                v, i = _bf16_topk(s, min(kk, s.shape[1]))
            else:
                s = q @ (part.float() if upcast else part).T
                v, i = _chunk_topk(s, min(kk, s.shape[1]), group)
            vals.append(v.float())
            idxs.append(i + bs)
        v, pos = torch.cat(vals, 1).topk(kk, dim=1)
        i = torch.cat(idxs, 1).gather(1, pos)
        if rescoring:
            exact = torch.einsum("qe,qke->qk", q32, bank.exact[i])
            v, pos = exact.topk(k, dim=1)
            i = i.gather(1, pos)
        sims_out.append(v)
        idx_out.append(i)
    return torch.cat(sims_out), torch.cat(idx_out)


def exact_topk(queries: Any, embeddings: Any, k: int, *, query_chunk: int = 1024):
    """Reference: float32 cosine similarities, one full ``topk`` per query chunk (numpy (Q, k) arrays)."""
    import numpy as np
    import torch

    bank = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings, np.float32)), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(queries, np.float32)), dim=1)
    out = [(q[s:s + query_chunk] @ bank.T).topk(k, dim=1) for s in range(0, len(q), query_chunk)]
    return torch.cat([o.values for o in out]).numpy(), torch.cat([o.indices for o in out]).numpy()


def recall(found: Any, exact: Any) -> float:
    """Mean fraction of each row of ``exact`` indices (Q, k) that appears in the same row of ``found``."""
    import numpy as np

    found, exact = np.asarray(found), np.asarray(exact)
    hits = sum(len(np.intersect1d(f, e)) for f, e in zip(found, exact, strict=True))
    return hits / exact.size
