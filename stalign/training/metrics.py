"""Cross-modal retrieval metrics on held-out spots: recall@k image->gene and gene->image, with chance level."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from stofm.util.errors import InputError

if TYPE_CHECKING:
    import torch

DEFAULT_KS = (1, 5, 10)


def true_match_ranks(queries: torch.Tensor, keys: torch.Tensor, *, chunk: int = 2048) -> torch.Tensor:
    """0-based rank of ``keys[i]`` among all keys for ``queries[i]`` by cosine similarity.

    Ties count against the query (a key scoring equal to the true one ranks ahead of it), so a collapsed
    model that maps everything to one point scores zero recall instead of perfect recall.
    """
    import torch

    if queries.shape != keys.shape or queries.ndim != 2:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} must be matching (N, E)")
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    k = torch.nn.functional.normalize(keys.float(), dim=-1)
    ranks = []
    for start in range(0, q.shape[0], chunk):
        sims = q[start:start + chunk] @ k.T  # (n, N)
        rows = torch.arange(sims.shape[0])
        true = sims[rows, rows + start].unsqueeze(1)
        ahead = (sims >= true).sum(dim=1) - 1  # minus the true key itself
        ranks.append(ahead)
    return torch.cat(ranks)


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, *, ks: Sequence[int] = DEFAULT_KS) -> dict[int, float]:
    """Fraction of queries whose true key (same row) is among the ``k`` most similar keys."""
    ranks = true_match_ranks(queries, keys)
    return {k: float((ranks < k).float().mean()) for k in ks}


def chance_recall(n: int, k: int) -> float:
    """Recall@k of a random ranking over ``n`` candidates."""
    return min(k, n) / n if n else 0.0


def retrieval_metrics(image_emb: torch.Tensor, gene_emb: torch.Tensor, *,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """``image_to_gene_recall@k``, ``gene_to_image_recall@k`` and ``chance@k`` (k/N) for each k, plus ``n_spots``.

    Row i of ``image_emb`` and of ``gene_emb`` come from the same spot.
    """
    n = int(image_emb.shape[0])
    if n == 0:
        raise InputError("retrieval metrics need at least one held-out spot")
    out: dict[str, float] = {"n_spots": float(n)}
    i2g = recall_at_k(image_emb, gene_emb, ks=ks)
    g2i = recall_at_k(gene_emb, image_emb, ks=ks)
    for k in ks:
        out[f"image_to_gene_recall@{k}"] = i2g[k]
        out[f"gene_to_image_recall@{k}"] = g2i[k]
        out[f"chance@{k}"] = chance_recall(n, k)
    return out


def format_retrieval(metrics: dict[str, float], *, ks: Sequence[int] = DEFAULT_KS) -> str:
    """One line: ``image->gene R@1 0.12 R@5 ... | gene->image ... | chance ... (N spots)``."""
    def row(prefix: str) -> str:
        return " ".join(f"R@{k} {metrics[f'{prefix}@{k}']:.3f}" for k in ks)

    return (f"image->gene {row('image_to_gene_recall')} | gene->image {row('gene_to_image_recall')} | "
            f"chance {row('chance').replace('R@', '@')} ({int(metrics['n_spots'])} held-out spots)")
