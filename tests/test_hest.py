"""HEST-Benchmark protocol: hand-computed Pearson and ridge, leakage-free splits, gene panel, real-crop table."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.tasks.hest import (
    LeakageError,
    check_no_leakage,
    cross_validate,
    group_splits,
    hest_gene_panel,
    pearson_per_gene,
    ridge_probe,
    seurat_hvg,
)


def test_pearson_matches_a_hand_computed_case():
    # y = 1,2,3,4 (mean 2.5), p = 1,3,2,4: sum of products of deviations = 2.25+.25+.25+2.25 = 4 ... / 5 = 0.8
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    p = np.array([[1.0], [3.0], [2.0], [4.0]])
    assert pearson_per_gene(y, p)[0] == pytest.approx(0.8)
    assert np.isnan(pearson_per_gene(y, np.ones((4, 1)))[0])  # constant prediction: undefined, as scipy


def test_pearson_is_undefined_for_constant_float32_predictions():
    """A float32 column of one value (e.g. the training mean) must centre to exactly 0: r is NaN, not float32
    rounding noise scored as a correlation."""
    rng = np.random.default_rng(0)
    y = rng.normal(size=(9, 50)).astype(np.float32)
    constant = np.tile(rng.normal(size=(1, 50)).astype(np.float32) * 3, (9, 1))
    assert np.isnan(pearson_per_gene(y, constant)).all()


def test_cross_validate_scores_each_fold_then_averages_over_genes_and_folds():
    y = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 0.0], [4.0, 1.0], [1.0, 2.0], [3.0, 5.0], [2.0, 1.0]])
    fixed = np.array([[1.0, 0.0], [3.0, 1.0], [2.0, 1.0], [4.0, 0.0], [2.0, 2.0], [1.0, 4.0], [3.0, 1.0]])
    splits = [(np.arange(4, 7), np.arange(0, 4)), (np.arange(0, 4), np.arange(4, 7))]
    result = cross_validate(lambda tr, te: fixed[te], y, splits, ["a", "b"])
    expected = [[pearson_per_gene(y[te, g:g + 1], fixed[te, g:g + 1])[0] for g in range(2)] for _, te in splits]
    assert expected[0][0] == pytest.approx(0.8)
    np.testing.assert_allclose(result.fold_pearson, expected)
    s = result.summary()
    assert s["pearson_mean"] == pytest.approx(np.mean(np.mean(expected, axis=1)))
    assert s["pearson_std"] == pytest.approx(np.std(np.mean(expected, axis=1)))
    assert s["mse"] == pytest.approx(np.mean([((fixed[te] - y[te]) ** 2).mean(0) for _, te in splits]))
    np.testing.assert_array_equal(result.predictions, fixed)


def test_ridge_probe_is_hests_closed_form_without_intercept():
    rng = np.random.default_rng(0)
    x, y, xt = rng.normal(size=(30, 4)), rng.normal(size=(30, 3)), rng.normal(size=(5, 4))
    alpha = 100 / (4 * 3)  # HEST: 100 / (n_features * n_targets)
    w = np.linalg.solve(x.T @ x + alpha * np.eye(4), x.T @ y)
    np.testing.assert_allclose(ridge_probe(x, y, xt, latent_dim=None), xt @ w, rtol=1e-4, atol=1e-6)
    # with PCA: the scaler and PCA are fit on the training fold only (the test rows do not change them)
    a = ridge_probe(x, y, xt, latent_dim=3)
    b = ridge_probe(x, y, np.vstack([xt, 100 * rng.normal(size=(5, 4))]), latent_dim=3)[:5]
    np.testing.assert_allclose(a, b)


def test_splits_by_slide_never_leak():
    groups = np.repeat(["p1", "p2", "p3", "p4", "p5"], [3, 4, 2, 5, 1])
    logo = group_splits(groups)
    assert len(logo) == 5 and all(len(set(groups[te])) == 1 for _, te in logo)
    folds = group_splits(groups, n_splits=3, shuffle_seed=0)
    assert len(folds) == 3
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(groups)
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(len(groups)))
    with pytest.raises(LeakageError, match="p1"):
        check_no_leakage(groups, [(np.array([0, 1, 3]), np.array([2, 4]))])
    with pytest.raises(ValueError, match="at least two"):
        group_splits(["only"] * 4)


def test_gene_panel_keeps_genes_detected_in_every_slide_and_takes_the_most_dispersed():
    rng = np.random.default_rng(1)
    counts = rng.poisson(5.0, size=(40, 30)).astype(float)
    counts[:, 3] = rng.poisson(5.0, size=40) * rng.integers(0, 2, size=40) * 8  # very over-dispersed
    counts[:20, 7] = 0  # over-dispersed but absent from slide A -> excluded, as HEST's min_cells_pct filter
    counts[20:, 7] = rng.poisson(40.0, size=20)
    genes = [f"g{i}" for i in range(30)]
    panel = hest_gene_panel(counts, genes, groups=["A"] * 20 + ["B"] * 20, k=5)
    assert len(panel) == 5 and "g3" in panel and "g7" not in panel
    assert panel == sorted(panel, key=genes.index)  # panel order, as HEST
    assert seurat_hvg(np.log1p(counts), 5).sum() == 5

