"""The exact closed form of ``RidgeProbe``'s StandardScaler + PCA(k) + Ridge (``solver="exact"``), for the
project's own protocol (``stalign bench --shards``); ``--hest-bench`` keeps HEST's sklearn recipe.

On the standardised, centred training features ``Xs`` with eigenpairs ``Xs^T Xs = V diag(s²) V^T``, the PCA scores
``Z = Xs V_k`` have ``Z^T Z = diag(s_k²)``, so the ridge on them needs no solver: the coefficients are
``V_k diag(1 / (s_k² + alpha)) V_k^T Xs^T y``, one matrix for every target at once. It is the exact solution of
what sklearn's pipeline approximates (randomised SVD for PCA, ``lsqr`` iterations to a tolerance for ridge).
The eigenpairs come from the smaller of ``Xs^T Xs`` (features) and ``Xs Xs^T`` (spots), in float64.
"""
from __future__ import annotations

import numpy as np


def _top_eigen(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenvalues (>= 0) and their eigenvectors of a symmetric positive semi-definite matrix.
    One BLAS thread: LAPACK's symmetric eigensolver is bound by matrix-vector products, which OpenBLAS threads
    barely speed up and slow down ~10x when other processes share the cores (1,280 features: 0.65 s on one
    thread, 6-7 s on two on the loaded 2-core machine; benchmarks/feature_store.py)."""
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    n = len(gram)
    with threadpool_limits(1):
        lam, vec = scipy.linalg.eigh(gram, subset_by_index=[n - k, n - 1], driver="evr")
    return np.maximum(lam, 0.0), vec


class ExactPcaRidge:
    """Fitted coefficients ``(mu, sd, coef, offset)``: ``predict(x) = ((x - mu) / sd) @ coef + offset``."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, latent_dim: int | None, alpha: float | None,
                 fit_intercept: bool) -> None:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        n, p = x.shape
        if latent_dim:  # StandardScaler (a constant feature keeps scale 1, as sklearn), then PCA centres
            self.mu = x.mean(0)
            sd = x.std(0)
            self.sd = np.where(sd > 10 * np.finfo(np.float64).eps * np.maximum(np.abs(self.mu), 1.0), sd, 1.0)
            k = min(latent_dim, n, p)
        else:  # ridge on the raw features (centred only for the intercept, as sklearn's Ridge)
            self.mu, self.sd, k = (x.mean(0) if fit_intercept else np.zeros(p)), np.ones(p), p
        xs = (x - self.mu) / self.sd
        alpha = alpha if alpha is not None else 100.0 / (k * y.shape[1])
        y_mean = y.mean(0) if fit_intercept else np.zeros(y.shape[1])
        xty = xs.T @ (y - y_mean)
        if latent_dim:
            if p <= n:
                lam, v = _top_eigen(xs.T @ xs, k)
            else:  # fewer spots than features: eigenvectors of the spots' Gram matrix, mapped to feature space
                lam, u = _top_eigen(xs @ xs.T, k)
                keep = lam > lam.max(initial=0.0) * 1e-12
                lam, v = lam[keep], xs.T @ u[:, keep] / np.sqrt(lam[keep])
            self.coef = v @ ((v.T @ xty) / (lam + alpha)[:, None])
        else:
            self.coef = np.linalg.solve(xs.T @ xs + alpha * np.eye(p), xty)
        self.offset = y_mean

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - self.mu) / self.sd) @ self.coef + self.offset
