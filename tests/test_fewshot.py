"""Few-shot probes and heads on frozen (real) embeddings of the crop."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.tasks.fewshot import (
    ExpressionHead,
    ExpressionProbe,
    LogisticProbe,
    PrototypeClassifier,
    few_shot_accuracy,
    head_predict,
    load_head,
    save_head,
)
from stalign.tasks.retrieval import GenePanelError


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad

    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    return adata.obsm["X_pca"][:, :20].astype(np.float32), adata.X.toarray(), list(adata.var_names), adata


def test_region_classifiers_from_three_shots_beat_chance(crop):
    emb, _, _, adata = crop
    labels = adata.obs["leiden"].astype(str).to_numpy()
    for factory in (PrototypeClassifier, LogisticProbe):
        result = few_shot_accuracy(factory, emb, labels, shots=3, repeats=5)
        assert result["n_classes"] == 2 and result["accuracy_mean"] > 0.75, (factory, result)
    proto = PrototypeClassifier().fit(emb, labels)
    p = proto.predict_proba(emb)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    assert set(proto.predict(emb)) <= set(labels)


def test_expression_probe_and_head_learn_held_out_spots(crop):
    emb, expr, genes, _ = crop
    top = np.argsort(-expr.var(0))[:30]
    y, g = expr[:, top], [genes[i] for i in top]
    train, test = np.arange(0, 49, 2), np.arange(1, 49, 2)
    mean_mse = ((y[test] - y[train].mean(0)) ** 2).mean()
    probe = ExpressionProbe(genes=g, latent_dim=10).fit(emb[train], y[train])
    head = ExpressionHead(genes=g, hidden=32).fit(emb[train], y[train], epochs=60)
    assert head.history[-1] < head.history[0]
    for model in (probe, head):
        pred = model.predict(emb[test])
        assert pred.shape == (len(test), 30)
        assert ((pred - y[test]) ** 2).mean() < mean_mse  # better than predicting the training mean


def test_heads_round_trip_and_check_genes(tmp_path, crop):
    emb, expr, genes, adata = crop
    head = ExpressionHead(genes=genes[:8], hidden=16).fit(emb, expr[:, :8], epochs=5)
    loaded = load_head(save_head(head, tmp_path / "head", embedding={"model": "X_pca"}))
    np.testing.assert_allclose(loaded.predict(emb), head.predict(emb), rtol=1e-6)
    assert loaded.embedding_info == {"model": "X_pca"}
    np.testing.assert_allclose(head_predict(loaded, emb, [genes[3], genes[1]]), head.predict(emb)[:, [3, 1]],
                               rtol=1e-6)
    with pytest.raises(GenePanelError, match="NotAGene"):
        head_predict(loaded, emb, ["NotAGene"])
    clf = load_head(save_head(LogisticProbe().fit(emb, adata.obs["leiden"].astype(str)), tmp_path / "clf"))
    with pytest.raises(ValueError, match="labels, not expression"):
        head_predict(clf, emb)
    with pytest.raises(FileNotFoundError, match="not a few-shot head"):
        load_head(tmp_path)
