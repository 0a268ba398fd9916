"""Reference banks on the real Visium crop: exact self-retrieval, chunked top-k, weighting, gene panels."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.tasks.retrieval import (
    GenePanelError,
    ReferenceBank,
    query_signature,
    signature_scores,
)


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad

    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    return adata.obsm["X_pca"].astype(np.float32), adata.X.toarray(), list(adata.var_names), adata


def test_k1_on_a_bank_that_contains_the_query_returns_its_own_expression(crop):
    emb, expr, genes, adata = crop
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=genes,
                         meta={"barcode": list(adata.obs_names)})
    pred = bank.predict(emb, k=1)
    np.testing.assert_allclose(pred, expr, atol=1e-6)
    hits = bank.hits(emb[:3], k=2)
    assert list(hits[hits["rank"] == 1]["barcode"]) == list(adata.obs_names[:3])
    np.testing.assert_allclose(hits[hits["rank"] == 1]["similarity"], 1.0, atol=1e-5)


def test_chunked_topk_equals_brute_force(crop):
    emb, expr, genes, _ = crop
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=genes)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(11, emb.shape[1])).astype(np.float32)
    sims, idx = bank.topk(queries, 7, chunk=5, query_chunk=3)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    full = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :7])
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, 1), atol=1e-5)
    half_sims, half_idx = bank.topk(queries, 7, dtype=__import__("torch").bfloat16)
    assert (half_idx[:, 0] == idx[:, 0]).mean() > 0.8 and np.abs(half_sims - sims).max() < 0.05


def test_prediction_is_the_softmax_weighted_mean_of_the_top_k():
    emb = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)
    expr = np.array([[1, 10], [2, 20], [3, 30], [4, 40]], np.float32)
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=["a", "b"])
    w = np.exp(np.array([1.0, 0.8]) / 0.5)
    w /= w.sum()
    np.testing.assert_allclose(bank.predict([[1, 0]], k=2, temperature=0.5)[0], w @ expr[:2], rtol=1e-5)
    np.testing.assert_allclose(bank.predict([[1, 0]], k=2, temperature=0.5, genes=["b"])[0], [w @ expr[:2, 1]],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        bank.predict([[1, 0]], temperature=0)


def test_save_load_round_trip_keeps_genes_and_meta(tmp_path, crop):
    emb, expr, genes, _ = crop
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=genes, meta={"slide_id": ["crop"] * len(emb)})
    loaded = ReferenceBank.load(bank.save(tmp_path / "bank"))
    assert loaded.genes == genes and list(loaded.meta["slide_id"]) == ["crop"] * len(emb)
    np.testing.assert_array_equal(loaded.expression, bank.expression)
    with pytest.raises(FileNotFoundError, match="not a reference bank"):
        ReferenceBank.load(tmp_path)


def test_gene_panel_errors_name_the_problem(crop):
    emb, expr, genes, _ = crop
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=genes)
    with pytest.raises(GenePanelError, match="another gene panel"):
        bank.check_genes(genes[:100] + ["NotAGene"])
    with pytest.raises(GenePanelError, match="NotAGene, AlsoMissing"):
        bank.predict(emb[:2], k=3, genes=[genes[0], "NotAGene", "AlsoMissing"])
    with pytest.raises(GenePanelError, match="1998"):
        signature_scores(np.ones(1998), expr, genes)
    with pytest.raises(GenePanelError, match="columns"):
        ReferenceBank(embeddings=emb, expression=expr, genes=genes[:-1])


def test_gene_signature_finds_the_region_that_expresses_it(crop):
    emb, expr, genes, adata = crop
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=genes)
    region = (adata.obs["leiden"] == "2").to_numpy()
    diff = expr[region].mean(0) - expr[~region].mean(0)
    markers = [genes[i] for i in np.argsort(-diff)[:10]]
    scores = query_signature(markers, bank=bank, embeddings=emb)
    assert scores.shape == (len(emb),)
    # the marker signature ranks the region's spots above the others (AUC well above chance)
    auc = (scores[region][:, None] > scores[~region][None]).mean()
    assert auc > 0.85, auc
    vector_scores = query_signature(expr[region].mean(0), bank=bank, embeddings=emb)
    assert (vector_scores[region][:, None] > vector_scores[~region][None]).mean() > 0.85


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_retrieve_refuses_non_finite_coordinates_as_predict_does(tmp_path, one_line, predict_setup, monkeypatch,
                                                                 bad):
    import stalign.tasks.embed as embed
    import stalign.tasks.predict as predict

    for module, name in ((predict, "embed_slide"), (embed, "load_reference")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("embedded before checking the coordinates"))
    coords = tmp_path / "coords.csv"
    coords.write_text(f"x,y\n10,20\n30,{bad}\n")
    common = ["--model", str(predict_setup["ckpt"]), "--reference", str(predict_setup["shards"]),
              "--slide", str(predict_setup["image"]), "--um-per-px", "0.73", "--coords", str(coords), "--quiet"]
    line = one_line(["retrieve", "image", *common, "--out", str(tmp_path / "hits.csv")], "NaN/inf", "row 1")
    predicted = one_line(["predict", *common, "--out", str(tmp_path / "pred.h5ad")])
    assert line.split(": error: ")[1] == predicted.split(": error: ")[1]  # the same message but for the command
    assert not (tmp_path / "hits.csv").exists()
