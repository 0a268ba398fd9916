"""faiss IVF / HNSW engines of ReferenceBank.topk for huge banks: recall against exact search, exact returned
scores, the index cached beside a saved bank (reused; refused when built for other contents), a clear error
without faiss."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from stalign.tasks import ann_index
from stalign.tasks.ann_index import FaissMissingError, IndexMismatchError, choose_index
from stalign.tasks.fast_topk import exact_topk, recall
from stalign.tasks.retrieval import ReferenceBank


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows around 256 centres (many near-ties, like spots of similar tissue)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(256, dim, generator=torch.Generator().manual_seed(7))
    x = c[torch.randint(0, 256, (n,), generator=g)] + 0.7 * torch.randn(n, dim, generator=g)
    return torch.nn.functional.normalize(x, dim=1).numpy()


@pytest.fixture(scope="module")
def data():
    emb = clustered(20_000, 32, seed=0)
    queries = clustered(100, 32, seed=1)
    expr = np.random.default_rng(0).gamma(1.0, 1.0, (len(emb), 3)).astype(np.float32)
    return emb, queries, expr, exact_topk(queries, emb, 50)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_index_recall_and_exact_scores(data, kind):
    emb, queries, expr, (exact_sims, exact_idx) = data
    bank = ReferenceBank(embeddings=emb * 3.0, expression=expr, genes=["a", "b", "c"])  # not unit: cosine anyway
    sims, idx = bank.topk(queries, 50, index=kind)
    assert recall(idx, exact_idx) >= 0.98, recall(idx, exact_idx)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    full = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ unit.T
    np.testing.assert_allclose(sims, np.take_along_axis(full, idx, 1), rtol=0, atol=1e-6)  # exact re-scoring
    assert (np.diff(sims, axis=1) <= 0).all()
    # a tighter search setting finds more of the exact top-50
    wide = {"nprobe": 128} if kind == "ivf" else {"ef_search": 400}
    assert recall(bank.topk(queries, 50, index=kind, index_params=wide)[1], exact_idx) >= 0.995
    pred = bank.predict(queries, k=50, index=kind)
    assert pred.shape == (len(queries), 3) and np.isfinite(pred).all()


def test_index_is_cached_beside_the_bank_reused_and_refused_for_other_contents(data, tmp_path, monkeypatch):
    emb, queries, expr, _ = data
    folder = ReferenceBank(embeddings=emb, expression=expr, genes=["a", "b", "c"]).save(tmp_path / "bank")
    first = ReferenceBank.load(folder)
    sims, idx = first.topk(queries, 10, index="ivf")
    files = sorted(p.name for p in folder.glob("index-*"))
    assert files == ["index-ivf-nlist512.faiss", "index-ivf-nlist512.json"], files
    desc = json.loads((folder / "index-ivf-nlist512.json").read_text())
    assert desc["bank_sha256"] == json.loads((folder / "bank.json").read_text())["sha256"]
    assert desc["params"]["nlist"] == 512 and desc["n_rows"] == len(emb)

    def no_build(*args, **kwargs):
        raise AssertionError("the cached index should have been read, not rebuilt")

    monkeypatch.setattr(ann_index, "build_index", no_build)
    again = ReferenceBank.load(folder).topk(queries, 10, index="ivf")
    np.testing.assert_array_equal(again[1], idx)
    np.testing.assert_array_equal(again[0], sims)
    # an index recorded for other bank contents is refused
    (folder / "index-ivf-nlist512.json").write_text(json.dumps({**desc, "bank_sha256": "0" * 64}))
    with pytest.raises(IndexMismatchError, match="built for another bank"):
        ReferenceBank.load(folder).topk(queries, 10, index="ivf")
    # saving new contents into the folder drops the stale index
    monkeypatch.undo()
    ReferenceBank(embeddings=emb[::-1].copy(), expression=expr, genes=["a", "b", "c"]).save(folder)
    assert not list(folder.glob("index-*"))


def test_auto_picks_faiss_only_for_huge_banks(data, monkeypatch):
    emb, queries, expr, (_, exact_idx) = data
    assert choose_index("auto", 10_000_000) == "ivf" and choose_index("auto", 1000) == "flat"
    with pytest.raises(ValueError, match="index must be one of"):
        choose_index("annoy", 10)
    monkeypatch.setattr(ann_index, "AUTO_FAISS_MIN_ROWS", 10_000)
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=["a", "b", "c"])
    bank.topk(queries[:5], 5)  # auto
    assert [key[0] for key in bank._ann] == ["ivf"]


def test_missing_faiss_is_one_clear_error_and_auto_stays_exact(data, monkeypatch):
    emb, queries, expr, (_, exact_idx) = data
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    monkeypatch.setattr(ann_index, "AUTO_FAISS_MIN_ROWS", 10_000)
    bank = ReferenceBank(embeddings=emb, expression=expr, genes=["a", "b", "c"])
    with pytest.raises(FaissMissingError, match=r"pip install 'stalign\[faiss\]'"):
        bank.topk(queries, 10, index="hnsw")
    assert isinstance(FaissMissingError("x"), RuntimeError)  # the CLIs print RuntimeErrors as one line
    _, idx = bank.topk(queries, 50)  # auto without faiss: exact brute force
    assert recall(idx, exact_idx) == 1.0 and not bank._ann


def test_commands_build_the_index_with_the_bank_and_search_through_it(predict_setup, tmp_path, capsys):
    from stalign.cli import main

    s = predict_setup
    bank = tmp_path / "bank"
    assert main(["retrieve", "bank", "--model", str(s["ckpt"]), "--shards", str(s["shards"]), "--out", str(bank),
                 "--index", "hnsw", "--workers", "0", "--quiet"]) == 0
    assert "hnsw index" in capsys.readouterr().out and (bank / "index-hnsw-M32-ef_construction80.faiss").is_file()
    coords = tmp_path / "coords.csv"
    coords.write_text("x,y\n300,500\n600,900\n")
    out = tmp_path / "hits.csv"
    assert main(["retrieve", "image", "--model", str(s["ckpt"]), "--reference", str(bank), "--slide", str(s["image"]),
                 "--um-per-px", str(s["manifest"]["slides"][0]["um_per_px"]), "--coords", str(coords), "--out",
                 str(out), "--k", "5", "--index", "hnsw", "--ef-search", "64", "--workers", "0", "--quiet"]) == 0
    import pandas as pd

    hits = pd.read_csv(out)
    assert len(hits) == 10 and (hits.groupby("query")["similarity"].diff().dropna() <= 0).all()
    assert main(["retrieve", "image", "--model", str(s["ckpt"]), "--reference", str(bank), "--slide", str(s["image"]),
                 "--um-per-px", "1", "--coords", str(coords), "--out", str(out), "--nprobe", "0", "--quiet"]) == 1
    assert "--nprobe must be >= 1" in capsys.readouterr().err
