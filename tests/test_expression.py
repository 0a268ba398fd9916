"""Expression: count detection, normalisation, gene panels, niche means and neighbours on real data."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.data import expression as ex
from stalign.data.errors import ExpressionError, GeneNameError
from stofm.util.knn import neighbor_indices


@pytest.fixture(scope="module")
def counts(fetched):
    """Real integer counts: 10,000 cells x 1,000 genes (scanpy's 10x subset), first 300 cells."""
    import anndata as ad

    a = ad.read_zarr(fetched("scanpy-10k-subset") / "10x-10k-subset.zarr")
    return np.asarray(a.X[:300], dtype=np.float32), list(a.var_names)


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad

    return ad.read_h5ad(squidpy_crop / "test_data.h5ad")


def test_raw_counts_are_log_normalised(counts):
    x, _ = counts
    y, mode = ex.normalise(x, source="counts")
    assert mode == ex.LOG1P_CP10K
    total = x.sum(1, keepdims=True)
    keep = total[:, 0] > 0
    np.testing.assert_allclose(y[keep], np.log1p(x[keep] / total[keep] * 1e4), rtol=1e-5, atol=1e-6)
    # each normalised spot sums back to 10k counts
    np.testing.assert_allclose(np.expm1(y[keep]).sum(1), 1e4, rtol=1e-4)


def test_normalised_input_is_kept_as_given(crop):
    y, mode = ex.normalise(crop.X, source="crop")
    assert mode == ex.AS_GIVEN
    np.testing.assert_array_equal(ex.dense(y), crop.X.toarray())


def test_real_duplicated_gene_names_are_refused(counts):
    _, genes = counts
    with pytest.raises(GeneNameError, match=r"slideA: duplicated gene names: .*'Rp1'"):
        ex.check_gene_names(genes, source="slideA")


def test_sparse_and_dense_counts_give_the_same_values(counts):
    import scipy.sparse as sp

    x, _ = counts
    y_dense, mode_dense = ex.normalise(x, source="dense")
    y_sparse, mode_sparse = ex.normalise(sp.csr_matrix(x), source="sparse")
    assert mode_dense == mode_sparse == ex.LOG1P_CP10K and sp.issparse(y_sparse)
    np.testing.assert_allclose(ex.dense(y_sparse), y_dense, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ex.gene_variance(y_sparse), ex.gene_variance(y_dense), rtol=1e-5, atol=1e-9)
    cols = np.array([5, 1, 900])
    np.testing.assert_allclose(ex.dense(y_sparse[:, cols]), y_dense[:, cols], rtol=1e-6, atol=1e-6)  # prep's panel columns


@pytest.mark.parametrize("sparse", [None, "csr", "csc"])
@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")])
def test_bad_values_are_refused(crop, bad, word, sparse):
    import scipy.sparse as sp

    x = crop.X.toarray()
    x[3, 7] = bad
    x = getattr(sp, f"{sparse}_matrix")(x) if sparse else x
    for check in (ex.normalise, ex.check_values):  # the prep's check, and the readers' on the matrix as given
        with pytest.raises(ExpressionError, match=rf"s1.h5ad: expression has 1 {word} value\(s\) \(first at spot 3, gene 7\)"):
            check(x, source="s1.h5ad")


def test_user_panel_keeps_order_and_lists_missing_genes(crop):
    genes = list(crop.var_names)
    panel = ex.select_panel({"a": genes, "b": genes[::-1]}, genes=[genes[5], genes[2]])
    assert panel == [genes[5], genes[2]]
    with pytest.raises(GeneNameError, match=r"missing from slides:\n  b: 'NotAGene'"):
        ex.select_panel({"a": genes + ["NotAGene"], "b": genes}, genes=["NotAGene", genes[0]])


def test_hvg_panel_ranks_shared_genes_by_mean_variance(crop):
    x = crop.X.toarray()
    genes = list(crop.var_names)
    var_a = ex.gene_variance(x)
    # slide b: the same data with the gene order reversed and the first gene absent
    genes_b = genes[1:][::-1]
    var_b = ex.gene_variance(x[:, 1:][:, ::-1])
    panel = ex.select_panel({"a": genes, "b": genes_b}, variances={"a": var_a, "b": var_b}, n_top_genes=20)
    assert len(panel) == 20 and genes[0] not in panel
    expected = sorted(genes[1:], key=lambda g: (-var_a[genes.index(g)], g))[:20]
    assert panel == expected
    # deterministic whatever the order the slides come in
    assert ex.select_panel({"b": genes_b, "a": genes}, variances={"a": var_a, "b": var_b}, n_top_genes=20) == panel


def test_niche_mean_matches_hand_computation(crop):
    expr = crop.X.toarray()
    xy = np.asarray(crop.obsm["spatial"], dtype=np.float64)
    width = 300.0  # px: each niche square holds a handful of the 137.5 px-apart spots
    out = ex.niche_expression(expr, xy, width)
    i = 10
    inside = [j for j in range(len(xy)) if abs(xy[j, 0] - xy[i, 0]) <= 150 and abs(xy[j, 1] - xy[i, 1]) <= 150]
    assert 1 < len(inside) < len(xy)
    np.testing.assert_allclose(out[i], expr[inside].mean(0), rtol=1e-6)


def test_neighbours_are_self_first_and_nearest(crop):
    xy = np.asarray(crop.obsm["spatial"], dtype=np.float64)
    nb = neighbor_indices(xy, 6)
    assert nb.shape == (49, 6) and nb.dtype == np.int32
    np.testing.assert_array_equal(nb[:, 0], np.arange(49))
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    for i in range(49):
        np.testing.assert_allclose(np.sort(d[i, nb[i]]), np.sort(d[i])[:6])
    # duplicated coordinates still put the spot itself first; fewer spots than k pad with -1
    dup = np.zeros((3, 2))
    np.testing.assert_array_equal(neighbor_indices(dup, 4)[:, 0], [0, 1, 2])
    assert (neighbor_indices(dup, 4)[:, 3] == -1).all()


def test_counts_layer_is_preferred_over_normalised_x(fetched):
    """Space Ranger counts in layers['counts'] with a log-normalised X: the counts are normalised here."""
    import anndata as ad

    from stalign.data.tenx import read_10x_h5

    a = read_10x_h5(fetched("squidpy-spaceranger") / "filtered_feature_bc_matrix.h5")
    counts = a.X.toarray().astype(np.float32)
    b = ad.AnnData(X=np.log1p(counts), layers={"counts": counts})
    y, mode = ex.normalise_adata(b, source="sr")
    assert mode == ex.LOG1P_CP10K
    np.testing.assert_allclose(y, ex.log1p_cp10k(counts))
    y, mode = ex.normalise_adata(ad.AnnData(X=np.log1p(counts)), source="sr")
    assert mode == ex.AS_GIVEN
