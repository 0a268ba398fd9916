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
)
from stalign.tasks.fewshot_io import load_head, save_head
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


def test_every_head_kind_round_trips_without_pickle(tmp_path, crop):
    """Ridge, logistic (2 and more classes), prototype and MLP heads give the same outputs after save/load."""
    emb, expr, genes, adata = crop
    labels = adata.obs["leiden"].astype(str).to_numpy()
    two = np.where(labels == labels[0], "a", "b")
    heads = {"ridge": ExpressionProbe(genes=genes[:6], latent_dim=16).fit(emb, expr[:, :6]),
             "logistic": LogisticProbe().fit(emb, labels), "logistic2": LogisticProbe().fit(emb, two),
             "prototype": PrototypeClassifier().fit(emb, labels)}
    for name, head in heads.items():
        folder = save_head(head, tmp_path / name)
        assert sorted(p.name for p in folder.iterdir()) == ["head.json", "head.safetensors"]
        loaded = load_head(folder)
        if name == "ridge":
            np.testing.assert_allclose(loaded.predict(emb), head.predict(emb), rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_allclose(loaded.predict_proba(emb), head.predict_proba(emb), rtol=1e-6, atol=1e-9)
            assert (loaded.predict(emb) == head.predict(emb)).all()
            assert list(loaded.classes_) == [str(c) for c in head.classes_]


def test_damaged_or_pickled_heads_are_refused(tmp_path, crop):
    import pickle

    emb, expr, genes, _ = crop
    folder = save_head(ExpressionProbe(genes=genes[:4], latent_dim=8).fit(emb, expr[:, :4]), tmp_path / "h")
    data = (folder / "head.safetensors").read_bytes()
    (folder / "head.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"head.safetensors: few-shot head is damaged"):
        load_head(folder)
    (folder / "head.safetensors").write_bytes(data[:-8] + np.float64(np.nan).tobytes())  # a NaN written in
    with pytest.raises(ValueError, match="damaged"):
        load_head(folder)
    (folder / "head.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"head.json: few-shot head description is not valid JSON"):
        load_head(folder)
    # an old pickled head: refused without unpickling (the payload would create a file)
    old = tmp_path / "old"
    old.mkdir()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (old / "head.pkl").write_bytes(pickle.dumps(Payload()))
    (old / "head.json").write_text('{"format": "stalign-fewshot-head"}')
    with pytest.raises(ValueError, match="pickles can run code"):
        load_head(old)
    assert not marker.exists()


def test_finetune_trains_the_last_blocks_by_default():
    from stalign.cli import build_parser

    args = build_parser().parse_args(["fewshot", "--model", "m", "--shards", "s", "--out", "o", "--kind", "finetune"])
    assert args.unfreeze_last == 2
