"""The HEST-Benchmark protocol (Jaume et al., NeurIPS 2024; mahmoodlab/HEST ``src/hest/bench``).

Followed from the reference code: genes = the top-50 highly variable genes (scanpy ``seurat`` flavour on
log1p expression, after keeping genes detected in >= 10% of the spots of every slide); targets = log1p
expression; features -> StandardScaler -> PCA(256, fit on the training fold) -> Ridge(solver='lsqr',
alpha = 100 / (n_features * n_targets), fit_intercept=False); folds by patient/slide; Pearson r per gene per
fold, averaged over genes, then mean and std over folds. We add MSE/MAE per gene and pooled out-of-fold
metrics (needed for leave-one-spot-out, where a fold holds one spot).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stofm.util.errors import InputError, StalignError

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (train_idx, test_idx) -> (n_test, G)


class LeakageError(StalignError, AssertionError):
    """A patient/slide (group) ended up on both sides of a split."""


# ---------------------------------------------------------------------------- genes
def seurat_hvg(log_expr: np.ndarray, k: int, *, n_bins: int = 20) -> np.ndarray:
    """Boolean mask of the ``k`` most variable genes, as scanpy ``highly_variable_genes(flavor='seurat')``:
    dispersion var/mean of expm1(log_expr), log, normalised within 20 bins of log1p(mean)."""
    import pandas as pd

    x = np.expm1(np.asarray(log_expr, dtype=np.float64))
    mean = x.mean(0)
    var = x.var(0, ddof=1) if len(x) > 1 else np.zeros_like(mean)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    disp = np.log(disp)
    mean = np.log1p(mean)
    df = pd.DataFrame({"means": mean, "dispersions": disp})
    df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
    grouped = df.groupby("mean_bin", observed=False)["dispersions"]
    bin_mean, bin_std = grouped.mean(), grouped.std(ddof=1)
    single = bin_std.isnull()
    bin_std[single], bin_mean[single] = bin_mean[single], 0
    norm = ((df["dispersions"].values - bin_mean[df["mean_bin"]].values) / bin_std[df["mean_bin"]].values)
    valid = np.sort(norm[~np.isnan(norm)])[::-1]
    if len(valid) == 0:
        raise InputError("no gene varies: cannot choose highly variable genes")
    cutoff = valid[min(k, len(valid)) - 1]
    return np.nan_to_num(norm, nan=-np.inf) >= cutoff


def hest_gene_panel(expression: np.ndarray, genes: Sequence[str], *, groups: Sequence[Any] | None = None,
                    k: int = 50, min_cells_pct: float = 0.10, log1p: bool = True) -> list[str]:
    """HEST's ``get_k_genes(criteria='var')``: the ``k`` highly variable genes among those detected in
    >= ``min_cells_pct`` of the spots of every slide (``groups``), in panel order. ``log1p=False`` when
    ``expression`` is already log-transformed."""
    expr = np.asarray(expression, dtype=np.float64)
    if expr.shape[1] != len(genes):
        raise InputError(f"expression has {expr.shape[1]} genes, the panel {len(genes)}")
    groups = np.zeros(len(expr)) if groups is None else np.asarray(groups)
    keep = np.ones(len(genes), dtype=bool)
    for g in np.unique(groups):
        sub = expr[groups == g]
        keep &= (sub > 0).sum(0) >= np.ceil(min_cells_pct * len(sub))
    keep &= np.array(["BLANK" not in g and "Control" not in g for g in genes])
    if keep.sum() == 0:
        raise InputError("no gene is detected in enough spots of every slide")
    cols = np.flatnonzero(keep)
    log_expr = np.log1p(expr[:, cols]) if log1p else expr[:, cols]
    chosen = cols[seurat_hvg(log_expr, k)][:k]
    return [str(genes[i]) for i in chosen]


# ---------------------------------------------------------------------------- splits
def check_no_leakage(groups: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
    """Raise ``LeakageError`` if a group appears in both the train and the test part of a split."""
    groups = np.asarray(groups)
    for i, (train, test) in enumerate(splits):
        shared = set(groups[train].tolist()) & set(groups[test].tolist())
        if shared:
            raise LeakageError(f"fold {i}: groups {sorted(shared)[:5]} are in both train and test")
        if len(np.intersect1d(train, test)):
            raise LeakageError(f"fold {i}: spots in both train and test")


def group_splits(groups: Sequence[Any], *, n_splits: int | None = None, shuffle_seed: int | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds by group (patient/slide): leave-one-group-out when ``n_splits`` is None or >= the number of
    groups, else ``GroupKFold`` (shuffled group order with ``shuffle_seed``). Checked for leakage."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    uniq = np.unique(groups)
    if len(uniq) < 2:
        raise InputError("the protocol needs at least two patients/slides (groups) to split by")
    if n_splits is None or n_splits >= len(uniq):
        splits = [(np.flatnonzero(groups != g), np.flatnonzero(groups == g)) for g in uniq]
    else:
        codes = np.searchsorted(uniq, groups)
        if shuffle_seed is not None:
            codes = np.random.default_rng(shuffle_seed).permutation(len(uniq))[codes]
        splits = list(GroupKFold(n_splits=n_splits).split(np.zeros(len(groups)), groups=codes))
    check_no_leakage(groups, splits)
    return splits


# ---------------------------------------------------------------------------- regressors + metrics
class RidgeProbe:
    """HEST's probe as an estimator: StandardScaler + PCA(latent_dim) + Ridge(solver='lsqr') with
    alpha = 100 / (n_features * n_targets) unless ``alpha`` is given. PCA keeps at most
    min(latent_dim, n_train, n_features) components; ``latent_dim=None`` skips scaler and PCA.
    ``solver="exact"``: the same model in closed form (``stalign.tasks.pca_ridge``: exact PCA, exact ridge, all
    targets at once) instead of HEST's sklearn pipeline (randomised PCA, iterative lsqr)."""

    def __init__(self, *, latent_dim: int | None = 256, alpha: float | None = None, fit_intercept: bool = False,
                 seed: int = 1, solver: str = "lsqr") -> None:
        if latent_dim is not None and latent_dim < 1:
            raise InputError(f"latent_dim (PCA components) must be >= 1 (or None: no PCA), got {latent_dim}")
        if solver not in ("lsqr", "exact"):
            raise InputError(f"ridge probe solver must be 'lsqr' (HEST) or 'exact', got {solver!r}")
        self.latent_dim, self.alpha, self.fit_intercept, self.seed = latent_dim, alpha, fit_intercept, seed
        self.solver = solver
        self.pipe: Any = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> RidgeProbe:
        if self.solver == "exact":
            from stalign.tasks.pca_ridge import ExactPcaRidge

            self.pipe = ExactPcaRidge(x, y, latent_dim=self.latent_dim, alpha=self.alpha,
                                      fit_intercept=self.fit_intercept)
            return self
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        steps: list[tuple[str, Any]] = []
        n_features = x.shape[1]
        if self.latent_dim:
            n_features = min(self.latent_dim, x.shape[0], x.shape[1])
            steps = [("scaler", StandardScaler()), ("pca", PCA(n_components=n_features, random_state=self.seed))]
        alpha = self.alpha if self.alpha is not None else 100.0 / (n_features * y.shape[1])
        steps.append(("ridge", Ridge(solver="lsqr", alpha=alpha, random_state=self.seed,
                                     fit_intercept=self.fit_intercept, max_iter=1000)))
        self.pipe = Pipeline(steps).fit(x, y)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self.pipe is None:
            raise RuntimeError("RidgeProbe.predict before fit")
        return self.pipe.predict(np.asarray(x, np.float64))


def ridge_probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, **probe: Any) -> np.ndarray:
    """Fit ``RidgeProbe(**probe)`` on the training fold (scaler and PCA included) and predict ``x_test``."""
    return RidgeProbe(**probe).fit(x_train, y_train).predict(x_test)


def pearson_per_gene(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Pearson r of each column (NaN where either side is constant, as scipy)."""
    t, p = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)  # means in float64: a constant float32
    a, b = t - t.mean(0), p - p.mean(0)  # column must centre to exactly 0, not to float32 rounding
    denom = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    scale = np.maximum(np.abs(t).max(0), np.abs(p).max(0))
    ok = denom > 1e-12 * np.maximum(scale, 1e-300) ** 2 * len(a)
    return np.where(ok, (a * b).sum(0) / np.where(ok, denom, 1.0), np.nan)


@dataclass
class ProtocolResult:
    """Per-fold, per-gene metrics of one predictor, plus the out-of-fold predictions."""

    genes: list[str]
    fold_pearson: np.ndarray  # (n_folds, G), NaN where undefined (a fold of one spot, constant output)
    fold_mse: np.ndarray
    fold_mae: np.ndarray
    predictions: np.ndarray  # (N, G) out-of-fold
    pooled_pearson: np.ndarray  # (G,) over all out-of-fold predictions

    def summary(self) -> dict[str, float]:
        """HEST's summary (mean over genes per fold; mean/std over folds) plus pooled Pearson, MSE, MAE."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN folds (one-spot folds) give NaN, by design
            per_fold = np.nanmean(self.fold_pearson, axis=1)
            per_gene = np.nanmean(self.fold_pearson, axis=0)
            return {"pearson_mean": float(np.nanmean(per_fold)), "pearson_std": float(np.nanstd(per_fold)),
                    "pearson_gene_std": float(np.nanstd(per_gene)),
                    "pooled_pearson_mean": float(np.nanmean(self.pooled_pearson)),
                    "pooled_pearson_std": float(np.nanstd(self.pooled_pearson)),
                    "mse": float(self.fold_mse.mean()), "mae": float(self.fold_mae.mean()),
                    "n_folds": len(self.fold_pearson), "n_genes": len(self.genes),
                    "undefined_pearson": int(np.isnan(self.fold_pearson).sum())}


def cross_validate(predict: Predictor, expression: np.ndarray, splits: Sequence[tuple[np.ndarray, np.ndarray]],
                   genes: Sequence[str]) -> ProtocolResult:
    """Run ``predict(train_idx, test_idx)`` on every fold; score each fold and the pooled predictions."""
    y = np.asarray(expression, np.float64)
    out = np.full_like(y, np.nan)
    pearson, mse, mae = [], [], []
    for train, test in splits:
        pred = np.asarray(predict(np.asarray(train), np.asarray(test)), np.float64)
        if pred.shape != (len(test), y.shape[1]):
            raise ValueError(f"predictor returned {pred.shape}, expected {(len(test), y.shape[1])}")
        out[test] = pred
        pearson.append(pearson_per_gene(y[test], pred) if len(test) > 1 else np.full(y.shape[1], np.nan))
        mse.append(((pred - y[test]) ** 2).mean(0))
        mae.append(np.abs(pred - y[test]).mean(0))
    tested = ~np.isnan(out).any(1)
    return ProtocolResult(genes=list(genes), fold_pearson=np.array(pearson), fold_mse=np.array(mse),
                          fold_mae=np.array(mae), predictions=out,
                          pooled_pearson=pearson_per_gene(y[tested], out[tested]))

