"""Masked-gene pretraining of the BERT cell encoder on real counts (scanpy's 10x 10k subset)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stofm.cell_encoder import BertCellEncoder, MLPCellEncoder, load_cell_encoder, save_cell_encoder
from stofm.gene_pretrain import IGNORE, MaskedGeneHead, mask_gene_tokens, masked_gene_loss, pretrain_cell_encoder
from stofm.util.optim import cosine_with_warmup
from stofm.vocab import GeneVocab


@pytest.fixture(scope="module")
def adata(fetched):
    anndata = pytest.importorskip("anndata")
    return anndata.read_zarr(fetched("scanpy-10k-subset") / "10x-10k-subset.zarr")


def test_masking_follows_bert_rule():
    vocab = GeneVocab.from_genes([f"g{i}" for i in range(500)])
    ids = torch.randint(vocab.n_special, len(vocab), (64, 200))
    ids[:, 0] = vocab.cls_id
    pad = torch.arange(200)[None, :] >= torch.randint(1, 200, (64, 1))
    ids[pad] = vocab.pad_id
    gen = torch.Generator().manual_seed(0)
    corrupted, labels = mask_gene_tokens(ids, pad, vocab=vocab, mask_prob=0.15, generator=gen)
    chosen = labels != IGNORE
    genes = ~pad & (ids != vocab.cls_id)
    assert not (chosen & ~genes).any()  # never <cls> or padding
    assert torch.equal(corrupted[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    assert abs(chosen.sum() / genes.sum() - 0.15) < 0.02
    masked = (corrupted[chosen] == vocab.mask_id).float().mean()
    kept = (corrupted[chosen] == ids[chosen]).float().mean()
    assert abs(masked - 0.8) < 0.05 and abs(kept - 0.1) < 0.05  # (a random gene may equal the original)
    assert (corrupted[chosen] >= vocab.n_special).sum() + (corrupted[chosen] == vocab.mask_id).sum() == chosen.sum()


def test_warmup_then_decay():
    schedule = cosine_with_warmup(warmup_steps=10, total_steps=100, min_lr_ratio=0.1)  # masked-gene pretraining's
    lrs = [schedule(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] > 0.1


@pytest.fixture()
def one_thread():
    """A tiny model trains faster on one thread, and much faster on a shared, busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_loss_decreases_on_real_counts_and_round_trips(adata, tmp_path, one_thread):
    genes = adata.var["gene_ids"].astype(str).tolist()
    torch.manual_seed(0)
    enc = BertCellEncoder(genes=genes, width=32, depth=2, heads=4, max_len=64, out_dim=32, dropout=0.0)
    assert not bool(enc.medians_fitted)
    hist = pretrain_cell_encoder(adata, None, enc, gene_key="gene_ids", steps=60, batch_size=16, lr=3e-3,
                                 max_cells=300, device="cpu", progress=False, seed=0)
    loss = np.array(hist["loss"])
    assert len(loss) == 60 and np.isfinite(loss).all()
    assert loss[:5].mean() == pytest.approx(math.log(len(enc.vocab)), abs=0.5)  # chance level at the start
    assert loss[-10:].mean() < loss[:5].mean() - 0.8, loss
    assert bool(enc.medians_fitted) and not enc.training
    x = torch.from_numpy(np.asarray(adata.X[300:310], dtype=np.float32))
    with torch.no_grad():
        before = enc(x)
        back = load_cell_encoder(save_cell_encoder(enc, tmp_path / "adapted"))
        assert torch.equal(back.eval()(x), before)


def test_empty_cells_give_a_zero_loss_not_nan():
    genes = [f"g{i}" for i in range(10)]
    enc = BertCellEncoder(genes=genes, width=16, depth=1, heads=2, max_len=8, out_dim=8, dropout=0.0)
    head = MaskedGeneHead(width=16, vocab_size=len(enc.vocab))
    ids, pad = enc.tokens(torch.zeros(3, 10))
    out = masked_gene_loss(enc, head, ids, pad)
    assert out["loss"].item() == 0.0 and out["loss"].requires_grad
    ids, pad = enc.tokens(torch.eye(10)[:3])  # one gene per cell: that gene is forced as a target
    out = masked_gene_loss(enc, head, ids, pad, mask_prob=0.01, generator=torch.Generator().manual_seed(0))
    assert out["loss"].item() > 0 and torch.isfinite(out["loss"])


@pytest.mark.gpu
def test_bf16_pretraining_on_cuda(adata):
    genes = adata.var["gene_ids"].astype(str).tolist()
    torch.manual_seed(0)
    enc = BertCellEncoder(genes=genes, width=64, depth=2, heads=4, max_len=128, out_dim=32, dropout=0.0)
    hist = pretrain_cell_encoder(adata, None, enc, gene_key="gene_ids", steps=40, batch_size=32, lr=3e-3,
                                 max_cells=500, device="cuda", progress=False)
    assert np.isfinite(hist["loss"]).all() and np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5]) - 0.5
    x = torch.from_numpy(np.asarray(adata.X[:64], dtype=np.float32)).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        low = enc(x)
    with torch.no_grad():
        assert (low * enc(x)).sum(1).min() > 0.99  # cosine of bf16 vs fp32 embeddings


def test_matrix_input_and_errors(adata):
    X = np.asarray(adata.X[:40], dtype=np.float32)
    genes = adata.var["gene_ids"].astype(str).tolist()
    enc = BertCellEncoder(genes=genes, width=16, depth=1, heads=2, max_len=16, out_dim=8, dropout=0.0)
    hist = pretrain_cell_encoder(X, genes, enc, steps=3, batch_size=8, device="cpu", progress=False)
    assert set(hist) == {"step", "loss", "accuracy", "lr"} and len(hist["loss"]) == 3
    assert hist["step"] == [0, 1, 2] and hist["lr"] == pytest.approx([1e-4, 1e-4, 0.55e-4])  # warm-up, cosine
    hist = pretrain_cell_encoder(X, genes, enc, steps=3, batch_size=8, device="cpu", progress=False, bf16=True)
    assert np.isfinite(hist["loss"]).all()  # the bf16 autocast path (used on GPUs) runs on CPU too
    with pytest.raises(ValueError, match="genes=..."):
        pretrain_cell_encoder(X, None, enc, steps=1)
    with pytest.raises(ValueError, match="999 gene names"):
        pretrain_cell_encoder(X, genes[:-1], enc, steps=1)
    with pytest.raises(TypeError, match="BertCellEncoder"):
        pretrain_cell_encoder(X, genes, MLPCellEncoder(genes=genes), steps=1)


def test_command_line_pretraining_on_two_files(adata, tmp_path, one_thread, capsys):
    import argparse
    import csv

    import anndata as ad
    import scipy.sparse as sp

    from stofm.gene_pretrain import add_arguments, run_from_args

    var = adata.var[["gene_ids"]].copy()
    var.index = var["gene_ids"].astype(str).to_numpy()
    ad.AnnData(X=sp.csr_matrix(np.asarray(adata.X[:120])), var=var).write_h5ad(tmp_path / "a.h5ad")
    cols = np.random.default_rng(0).permutation(1000)[:800]  # other gene order, a subset
    ad.AnnData(X=np.asarray(adata.X[120:200])[:, cols], var=var.iloc[cols]).write_h5ad(tmp_path / "b.h5ad")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "adapted"
    args = parser.parse_args([str(tmp_path / "a.h5ad"), str(tmp_path / "b.h5ad"), "--out", str(out),
                              "--width", "16", "--depth", "1", "--heads", "2", "--max-len", "32", "--out-dim", "8",
                              "--steps", "4", "--batch-size", "16", "--device", "cpu"])
    assert run_from_args(args) == 0
    enc = load_cell_encoder(out)
    assert isinstance(enc, BertCellEncoder) and len(enc.genes) == 800 and bool(enc.medians_fitted)
    rows = list(csv.DictReader(open(out / "pretrain_log.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3] and all(np.isfinite(float(r["loss"])) for r in rows)
    assert "loss" in capsys.readouterr().out
    args.inputs = [str(tmp_path / "missing.h5ad")]
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        run_from_args(args)
    args.inputs, args.layer = [str(tmp_path / "a.h5ad")], "counts"
    with pytest.raises(ValueError, match="no layer 'counts'"):
        run_from_args(args)
