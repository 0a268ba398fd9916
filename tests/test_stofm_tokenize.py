"""Rank-value tokenizer and gene vocabulary: hand-computed order, sparse/dense/log1p agreement, unknown genes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stofm.tokenize import RankValueTokenizer, TokenizeError, fit_medians
from stofm.vocab import GeneVocab, GeneVocabError, UnknownGenesWarning

GENES = ["g0", "g1", "g2", "g3", "g4", "g5"]
MEDIANS = {"g0": 1.0, "g1": 2.0, "g2": 0.5, "g3": 1.0, "g4": 4.0, "g5": 1.0}
X_TINY = np.array([
    [2, 4, 0, 2, 8, 1],   # g0,g1,g3,g4 tie at score 2; g5 = 1; g2 zero
    [0, 0, 3, 0, 0, 0],   # g2 = 6
    [1, 0, 0, 0, 0, 10],  # g5 = 10, g0 = 1
    [0, 0, 0, 0, 0, 0],   # empty cell
], dtype=np.float32)


@pytest.fixture(scope="module")
def vocab() -> GeneVocab:
    # reversed order: token ids g5=4, g4=5, g3=6, g2=7, g1=8, g0=9 (ties break by token id, not column)
    return GeneVocab.from_genes(GENES[::-1])


@pytest.fixture(scope="module")
def counts_10k(fetched):
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_zarr(fetched("scanpy-10k-subset") / "10x-10k-subset.zarr")
    return np.asarray(adata.X[:300], dtype=np.float32), adata.var["gene_ids"].astype(str).tolist()


def test_order_matches_hand_computation(vocab):
    ids, pad = RankValueTokenizer(vocab=vocab, gene_medians=MEDIANS, max_len=4)(X_TINY, GENES)
    expected = torch.tensor([
        [1, 5, 6, 8, 9],  # cls, g4, g3, g1, g0 (tied, by token id); g5 truncated at max_len=4
        [1, 7, 0, 0, 0],  # cls, g2
        [1, 4, 9, 0, 0],  # cls, g5, g0
        [1, 0, 0, 0, 0],  # cls only
    ])
    assert torch.equal(ids, expected)
    assert torch.equal(pad, expected == 0)
    assert ids.dtype == torch.long and pad.dtype == torch.bool
    assert vocab.decode(ids[2, :3].tolist()) == ["<cls>", "g5", "g0"]


def test_without_truncation_and_column_order_irrelevant(vocab):
    tok = RankValueTokenizer(vocab=vocab, gene_medians=MEDIANS, max_len=2048)
    ids, _ = tok(X_TINY, GENES)
    assert ids[0].tolist() == [1, 5, 6, 8, 9, 4]
    perm = [3, 0, 5, 1, 4, 2]
    ids_perm, _ = tok(X_TINY[:, perm], [GENES[i] for i in perm])
    assert torch.equal(ids, ids_perm)


def _log1p_cp10k(X: np.ndarray) -> np.ndarray:
    total = X.sum(1, keepdims=True)
    return np.log1p(np.divide(X * 1e4, total, out=np.zeros_like(X), where=total > 0))


def _count_scores(ids: torch.Tensor, X: np.ndarray, genes: list[str], tok: RankValueTokenizer) -> np.ndarray:
    """counts/median of each token (0 at <cls>/padding), from the counts matrix."""
    col = {int(t): j for j, t in enumerate(tok.vocab.match(genes)[0])}
    med = np.array([tok.gene_medians.get(g, np.nan) for g in genes])
    out = np.zeros(ids.shape)
    for r, row in enumerate(ids.tolist()):
        for k, t in enumerate(row[1:], start=1):
            if t != 0:
                out[r, k] = X[r, col[t]] / med[col[t]]
    return out


def test_sparse_dense_log1p_and_batching_agree(vocab):
    tok = RankValueTokenizer(vocab=vocab, gene_medians=MEDIANS, max_len=3)
    dense = tok(X_TINY, GENES)
    for other in (tok(sp.csr_matrix(X_TINY), GENES), tok(sp.csc_matrix(X_TINY), GENES, batch_size=1)):
        assert torch.equal(dense[0], other[0]) and torch.equal(dense[1], other[1])
    # log1p: the same order up to genes whose scores tie exactly in counts (float rounding picks there)
    ids_log, pad_log = tok(_log1p_cp10k(X_TINY), GENES, input="log1p", batch_size=3)
    assert torch.equal(pad_log, dense[1])
    assert np.array_equal(_count_scores(ids_log, X_TINY, GENES, tok), _count_scores(dense[0], X_TINY, GENES, tok))
    assert torch.equal(ids_log[1:], dense[0][1:])  # cells without ties: identical ids


def test_real_counts_sparse_dense_log1p_agree(counts_10k):
    X, genes = counts_10k
    tok = RankValueTokenizer.fit(X, genes, max_len=64)
    ids, pad = tok(X, genes, batch_size=128)
    ids_sp, pad_sp = tok(sp.csr_matrix(X), genes, batch_size=77)
    assert torch.equal(ids, ids_sp) and torch.equal(pad, pad_sp)
    nnz = (X > 0).sum(1)
    assert ids.shape[1] == 1 + min(64, nnz.max())
    assert torch.equal((~pad).sum(1), torch.from_numpy(1 + np.minimum(nnz, 64)))
    assert (ids[:, 0] == tok.vocab.cls_id).all() and (ids[pad] == 0).all()
    ids_log, pad_log = tok(_log1p_cp10k(X), genes, input="log1p")
    assert torch.equal(pad, pad_log)
    same = (ids == ids_log).all(1)
    assert same.float().mean() > 0.5  # most cells identical; the rest differ only inside exact ties:
    np.testing.assert_allclose(_count_scores(ids_log, X, genes, tok), _count_scores(ids, X, genes, tok), rtol=1e-5)
    # first token of a cell = gene with the largest counts/median (checked by hand in numpy)
    med = np.array([tok.gene_medians.get(g, np.nan) for g in genes])
    best = np.where(np.isfinite(med), X / med, -1).argmax(1)
    assert ids[:, 1].tolist() == tok.vocab.encode([genes[j] for j in best]).tolist()


def test_fit_medians_hand_computed_and_sparse():
    X = np.array([[1, 0], [3, 2], [0, 0], [4, 6]], dtype=np.float32)
    med = fit_medians(X, ["a", "b"])
    # normalised rows: [1e4, 0], [6000, 4000], -, [4000, 6000]
    assert med == pytest.approx({"a": 6000.0, "b": 5000.0})
    assert fit_medians(sp.csr_matrix(X), ["a", "b"], batch_size=1) == pytest.approx(med)
    assert fit_medians(X[:, :1], ["a"]) == pytest.approx({"a": 1e4})
    assert "b" not in fit_medians(np.array([[1.0, 0.0]]), ["a", "b"])  # never expressed
    # above max_cells: exact medians of a seeded random sample of the cells
    rng = np.random.default_rng(5)
    Xs = rng.poisson(3.0, size=(50, 4)).astype(np.float32)
    sampled = fit_medians(sp.csr_matrix(Xs), list("abcd"), max_cells=20, seed=3, batch_size=7)
    rows = np.sort(np.random.default_rng(3).choice(50, size=20, replace=False))
    assert sampled == pytest.approx(fit_medians(Xs[rows], list("abcd")))
    assert sampled != pytest.approx(fit_medians(Xs, list("abcd")))


def test_bad_input_is_refused(vocab):
    tok = RankValueTokenizer(vocab=vocab, gene_medians=MEDIANS)
    with pytest.raises(TokenizeError, match="NaN"):
        tok(np.where(X_TINY > 5, np.nan, X_TINY), GENES)
    with pytest.raises(TokenizeError, match="negative"):
        tok(-X_TINY, GENES)
    with pytest.raises(TokenizeError, match="genes were given"):
        tok(X_TINY, GENES[:-1])
    with pytest.raises(TokenizeError, match="counts"):
        tok(X_TINY, GENES, input="raw")


def test_vocab_reports_unknown_genes(vocab, tmp_path):
    ids, n_unknown, examples = vocab.match(["g1", "Foo", "g0", "Bar"])
    assert ids.tolist() == [8, 3, 9, 3] and n_unknown == 2 and examples == ["Foo", "Bar"]
    with pytest.warns(UnknownGenesWarning, match=r"2 of 4 genes .*Foo"):
        vocab.encode(["g1", "Foo", "g0", "Bar"])
    with pytest.raises(GeneVocabError, match="none of the 2 genes"):
        vocab.encode(["Foo", "Bar"])
    tok = RankValueTokenizer(vocab=vocab, gene_medians=MEDIANS)
    with pytest.warns(UnknownGenesWarning, match="1 of 7"):
        ids, _ = tok(np.hstack([X_TINY, np.full((4, 1), 100.0, np.float32)]), GENES + ["Foo"])
    assert 3 not in ids.tolist()[0]  # unknown genes are left out, not tokenised as <unk>


def test_vocab_files_and_ensembl_versions(tmp_path):
    ens = GeneVocab.from_genes(["ENSG00000141510", "ENSG00000012048", "TP53", "ENSG00000141510"])
    assert len(ens) == 4 + 3 and ens.genes[0] == "ENSG00000141510"
    assert ens.match(["ENSG00000012048.23", "tp53"])[0].tolist() == [5, 6]
    txt = tmp_path / "genes.txt"
    txt.write_text("# header\nXkr4\nRp1\n\nSox17\n")
    assert GeneVocab.from_file(txt).genes == ["Xkr4", "Rp1", "Sox17"]
    lst = tmp_path / "genes.json"
    lst.write_text(json.dumps(["a", "b"]))
    assert GeneVocab.from_file(lst).genes == ["a", "b"]
    gf = tmp_path / "token_dict.json"
    gf.write_text(json.dumps({"<pad>": 0, "<mask>": 1, "B": 3, "A": 2}))
    assert GeneVocab.from_file(gf).genes == ["A", "B"]
    saved = ens.save(tmp_path / "sub" / "vocab.json")
    assert GeneVocab.from_file(saved) == ens
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        GeneVocab.from_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(GeneVocabError, match="bad.json"):
        GeneVocab.from_file(bad)
    (tmp_path / "token_dict.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(GeneVocabError, match="pickle files are not read"):
        GeneVocab.from_file(tmp_path / "token_dict.pkl")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(GeneVocabError, match="binary.txt"):
        GeneVocab.from_file(tmp_path / "binary.txt")
    with pytest.raises(GeneVocabError, match="special"):
        GeneVocab.from_genes(["<cls>", "a"])
