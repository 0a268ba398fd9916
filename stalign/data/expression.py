"""Expression: raw-count detection, log1p(counts per 10k), the shared gene panel, niche means, neighbours.

Gene panel: either a user list (every slide must hold every gene) or the top-N highly variable genes of
the genes shared by all slides. "Highly variable" = the variance of the log-normalised values
(log1p(counts/total*1e4), or the values as given when the input is already normalised), computed per slide
and averaged over slides, so one slide's batch offset cannot dominate. Genes are ordered by that score,
descending, ties broken by gene name: the same inputs always give the same panel in the same order.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stalign.data.errors import ExpressionError, GeneNameError, examples

LOG1P_CP10K = "log1p_cp10k"
AS_GIVEN = "as_given"
TARGET_SUM = 1e4


def _sparse(x) -> bool:
    import scipy.sparse as sp

    return sp.issparse(x)


def as_matrix(x):
    """float32 expression: CSR when ``x`` is sparse (kept sparse, so whole transcriptomes fit), else dense."""
    import scipy.sparse as sp

    if sp.issparse(x):
        m = sp.csr_matrix(x, dtype=np.float32)
        m.sum_duplicates()
        return m
    return np.asarray(x, dtype=np.float32)


def dense(x) -> np.ndarray:
    """A dense float32 copy of a (possibly sparse) matrix."""
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x, dtype=np.float32)


def check_values(x, *, source: str) -> None:
    """Refuse non-numeric, NaN, infinite or negative expression values (any sparse format or a dense array),
    naming ``source`` and the first bad spot."""
    values = x.data if _sparse(x) else np.asarray(x)
    if values.dtype.kind not in "biuf":
        raise ExpressionError(f"{source}: expression has non-numeric type {values.dtype}")
    for what, test in (("NaN", np.isnan), ("infinite", np.isinf), ("negative", lambda v: v < 0)):
        bad = test(values)
        if bad.any():
            if _sparse(x):
                csr = x.tocsr()
                k = int(np.argmax(test(csr.data)))
                row, col = int(np.searchsorted(csr.indptr, k, side="right") - 1), int(csr.indices[k])
            else:
                row, col = np.argwhere(bad)[0]
            raise ExpressionError(f"{source}: expression has {int(bad.sum())} {what} value(s) "
                                  f"(first at spot {row}, gene {col}); expression must be finite and >= 0")


def check_gene_names(genes: Sequence[str], *, source: str) -> list[str]:
    """Gene names as a list of str; duplicated names are an error listing them."""
    names = [str(g) for g in genes]
    uniq, counts = np.unique(np.asarray(names, dtype=object), return_counts=True)
    dup = sorted(str(g) for g in uniq[counts > 1])
    if dup:
        raise GeneNameError(f"{source}: duplicated gene names: {examples(dup, 10)}")
    return names


def is_raw_counts(x) -> bool:
    """True when every value is a non-negative integer (raw counts) and some are non-zero."""
    values = x.data if _sparse(x) else x
    if values.size == 0 or not np.any(values):
        return False
    return bool(np.all(values >= 0) and np.all(np.abs(values - np.rint(values)) < 1e-6))


def log1p_cp10k(counts):
    """log1p(counts / total per spot * 1e4), float32 (sparse stays sparse); spots with zero total stay zero."""
    import scipy.sparse as sp

    total = np.asarray(counts.sum(axis=1, dtype=np.float64)).reshape(-1)
    scale = np.divide(TARGET_SUM, total, out=np.zeros_like(total), where=total > 0)
    if _sparse(counts):
        out = sp.csr_matrix(sp.diags(scale) @ counts.astype(np.float64))
        out.data = np.log1p(out.data)
        return out.astype(np.float32)
    return np.log1p(counts * scale[:, None]).astype(np.float32)


def normalise(x, *, source: str):
    """Validated, log-normalised expression (``as_matrix``: sparse stays sparse) and the mode used
    (``log1p_cp10k`` or ``as_given``).

    Raw integer counts are normalised over *all* genes of the slide (before the panel is taken), so the
    values do not depend on which panel is chosen; non-integer input is taken as already normalised.
    """
    x = as_matrix(x)
    check_values(x, source=source)
    if is_raw_counts(x):
        return log1p_cp10k(x), LOG1P_CP10K
    return x, AS_GIVEN


def normalise_adata(adata, *, source: str):
    """``normalise`` of ``layers['counts']`` when it holds raw counts (X may be normalised already), else of X."""
    if "counts" in getattr(adata, "layers", {}):
        counts = as_matrix(adata.layers["counts"])
        check_values(counts, source=f"{source} layers['counts']")
        if is_raw_counts(counts):
            return log1p_cp10k(counts), LOG1P_CP10K
    return normalise(adata.X, source=source)


def gene_variance(x) -> np.ndarray:
    """Per-gene (population) variance of normalised expression, float64."""
    if _sparse(x):
        x = x.astype(np.float64)
        mean = np.asarray(x.mean(axis=0)).reshape(-1)
        return np.maximum(np.asarray(x.multiply(x).mean(axis=0)).reshape(-1) - mean ** 2, 0.0)
    return x.astype(np.float64).var(axis=0)


def select_panel(slide_genes: dict[str, Sequence[str]], *, genes: Sequence[str] | None = None,
                 variances: dict[str, np.ndarray] | None = None, n_top_genes: int = 50) -> list[str]:
    """The gene panel shared by all slides.

    ``slide_genes`` maps slide id -> its gene names. With ``genes`` every slide must hold all of them
    (otherwise the missing genes are listed per slide). Without, ``variances`` (slide id -> per-gene
    variance aligned with that slide's genes) ranks the shared genes and the top ``n_top_genes`` are kept.
    """
    if not slide_genes:
        raise ExpressionError("no slides given")
    if genes is not None:
        panel = check_gene_names(genes, source="requested gene panel")
        if not panel:
            raise GeneNameError("the requested gene panel is empty")
        missing = {sid: [g for g in panel if g not in set(names)] for sid, names in slide_genes.items()}
        missing = {sid: m for sid, m in missing.items() if m}
        if missing:
            lines = [f"  {sid}: {examples(m, 20)}" for sid, m in missing.items()]
            raise GeneNameError("genes of the requested panel are missing from slides:\n" + "\n".join(lines))
        return panel
    if n_top_genes < 1:
        raise ExpressionError(f"n_top_genes must be >= 1, got {n_top_genes}")
    if variances is None:
        raise ExpressionError("variances are needed to select highly variable genes")
    shared = set.intersection(*(set(names) for names in slide_genes.values()))
    if not shared:
        raise GeneNameError(f"the slides {sorted(slide_genes)} share no gene names")
    shared_sorted = sorted(shared)
    score = np.zeros(len(shared_sorted))
    for sid, names in slide_genes.items():
        pos = {g: i for i, g in enumerate(names)}
        score += variances[sid][[pos[g] for g in shared_sorted]]
    score /= len(slide_genes)
    order = np.lexsort((np.arange(len(shared_sorted)), -score))  # score desc, then name (already sorted)
    return [shared_sorted[i] for i in order[:n_top_genes]]


def panel_columns(genes: Sequence[str], panel: Sequence[str]) -> np.ndarray:
    """Column index in ``genes`` of every gene of ``panel``."""
    pos = {g: i for i, g in enumerate(genes)}
    return np.asarray([pos[g] for g in panel], dtype=np.int64)


def niche_members(coords: np.ndarray, half_width: float) -> list[np.ndarray]:
    """For each spot, the sorted indices of the spots whose centres lie in the square of half-width
    ``half_width`` around it (borders included; the spot itself always counts)."""
    from scipy.spatial import cKDTree

    if len(coords) == 0:
        return []
    tree = cKDTree(coords)
    found = tree.query_ball_point(coords, r=half_width, p=np.inf)
    return [np.asarray(sorted(set(m) | {i}), dtype=np.int64) for i, m in enumerate(found)]


def niche_expression(expr: np.ndarray, coords: np.ndarray, niche_width: float) -> np.ndarray:
    """Mean expression of the spots whose centres lie inside the ``niche_width``-wide square around
    each spot (same units as ``coords``)."""
    members = niche_members(coords, niche_width / 2.0)
    out = np.empty(expr.shape, dtype=np.float32)
    for i, m in enumerate(members):
        out[i] = expr[m].mean(axis=0, dtype=np.float64)
    return out
