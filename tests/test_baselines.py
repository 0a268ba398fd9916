"""Baselines on the real Visium crop: known figures reproduced, LOO bias shown, features well-formed."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.tasks.baselines import (
    colour_features,
    evaluation_splits,
    knn_predictor,
    mean_predictor,
    neighbour_predictor,
    run_baselines,
    top_variance_genes,
)


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad

    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    x = adata.X.toarray()
    genes = top_variance_genes(x, list(adata.var_names), 50)
    y = x[:, [list(adata.var_names).index(g) for g in genes]].astype(np.float64)
    return adata, y, genes


def test_neighbour_average_reproduces_the_known_figure_and_loo_biases_the_mean(crop):
    adata, y, genes = crop
    table = run_baselines({"mean": mean_predictor(y), "neighbours": neighbour_predictor(adata.obsm["spatial"], y)},
                          y, genes).set_index(["scheme", "method"])
    # known on this crop: neighbour average (6 nearest), leave-one-out, mean per-gene Pearson +0.18
    assert table.loc[("loo", "neighbours"), "pooled_pearson_mean"] == pytest.approx(0.18, abs=0.005)
    # the training mean without the held-out spot is (S - y_i)/(n - 1): exactly anti-correlated under LOO
    assert table.loc[("loo", "mean"), "pooled_pearson_mean"] == pytest.approx(-1.0, abs=1e-6)
    # ... so MSE is the fair comparison: neighbours beat the mean on both schemes
    for scheme in ("loo", "5-fold"):
        assert table.loc[(scheme, "neighbours"), "mse"] < table.loc[(scheme, "mean"), "mse"]
    assert table.loc[("5-fold", "neighbours"), "n_folds"] == 5


def test_splits_and_knn():
    assert len(evaluation_splits(10, "loo")) == 10
    folds = evaluation_splits(10, "5-fold")
    assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="scheme"):
        evaluation_splits(10, "bootstrap")
    x = np.array([[0.0, 1], [0, 1.1], [1, 0], [1.1, 0]])
    y = np.array([[1.0], [3.0], [10.0], [20.0]])
    np.testing.assert_allclose(knn_predictor(x, y, k=1)(np.array([1, 3]), np.array([0, 2])), [[3.0], [20.0]])


def test_colour_and_imagenet_features_on_real_crops(squidpy_crop, fetched, crop):
    import stalign.data.slide as slide_mod
    from stalign.tasks.baselines import image_features

    fetched("efficientnet-lite0")
    adata, _, _ = crop
    slide = slide_mod.open_slide(squidpy_crop / "test_img.jpg", um_per_px=55 / 89.44476)
    patches, _ = slide.read_crops(adata.obsm["spatial"][:6], 112 / slide.um_per_px, 224)
    colour = colour_features(patches)
    assert colour.shape == (6, 31) and np.isfinite(colour).all() and colour.std(0).max() > 0
    feats = image_features(patches, spec="efficientnet-lite0", batch_size=3)
    assert feats.shape == (6, 1280) and np.isfinite(feats).all()
    again = image_features(patches[:2], spec="efficientnet-lite0")
    np.testing.assert_allclose(again, feats[:2], rtol=1e-4, atol=1e-4)
