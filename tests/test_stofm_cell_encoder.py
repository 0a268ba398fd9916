"""Cell encoders (BERT over rank tokens, MLP over a panel): shape, norm, batch/padding invariance, gradients, I/O."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from stofm.cell_encoder import (
    CELL_ENCODERS,
    BertCellEncoder,
    MLPCellEncoder,
    build_cell_encoder,
    load_cell_encoder,
    register_cell_encoder,
    save_cell_encoder,
)

GENES = [f"gene{i}" for i in range(40)]
TINY = {"bert": dict(width=32, depth=2, heads=4, max_len=24, out_dim=16, dropout=0.0),
        "mlp": dict(hidden=32, depth=2, out_dim=16, dropout=0.0)}


def _counts(n: int, *, seed: int = 0, density: float = 0.4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n, len(GENES), generator=g) * 6, generator=g)
    return x * (torch.rand(n, len(GENES), generator=g) < density)


def _build(kind: str, **over):
    torch.manual_seed(0)
    enc = build_cell_encoder(kind, genes=GENES, **{**TINY[kind], **over})
    if kind == "bert":
        enc.set_medians(np.linspace(0.5, 3.0, len(GENES)))
    return enc.eval()


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_shape_norm_and_batch_permutation(kind):
    enc = _build(kind)
    x = _counts(7)
    x[0] = 0
    x[0, 3] = 5  # a cell with a single expressed gene
    out = enc(x)
    assert out.shape == (7, 16) and enc.out_dim == 16 and enc.genes == GENES
    assert torch.allclose(out.norm(dim=1), torch.ones(7), atol=1e-5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(enc(x[perm]), out[perm], atol=1e-5)
    assert not torch.allclose(out[1], out[2], atol=1e-3)  # different cells, different embeddings


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_counts_and_log1p_input_agree(kind):
    enc = _build(kind)
    x = _counts(5)
    log1p = torch.log1p(x / x.sum(1, keepdim=True) * 1e4)
    assert torch.allclose(enc(x), enc(log1p, input_kind="log1p"), atol=1e-4)


def test_padding_does_not_change_a_cell():
    enc = _build("bert")
    short = _counts(1, seed=3, density=0.1)
    long = _counts(4, seed=4, density=0.9)
    assert (short > 0).sum() < (long > 0).sum(1).min()
    alone = enc(short)
    batched = enc(torch.cat([long[:2], short, long[2:]]))
    assert torch.allclose(alone[0], batched[2], atol=1e-5)
    ids, pad = enc.tokens(torch.cat([short, long]))
    assert pad[0].sum() > pad[1:].sum(1).max()  # the short cell really was padded in the batch


def test_truncation_at_max_len():
    enc = _build("bert", max_len=8)
    x = _counts(3, density=0.9)
    ids, pad = enc.tokens(x)
    assert ids.shape == (3, 9) and (ids[:, 0] == enc.vocab.cls_id).all()
    out = enc.forward_tokens(ids, pad)
    assert out["cls"].shape == (3, 16) and out["hidden"].shape == (3, 9, 32)
    with pytest.raises(ValueError, match="exceed max_len"):
        enc.forward_tokens(torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 10, dtype=torch.bool))


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_gradients_reach_every_parameter(kind):
    enc = _build(kind, **({"dropout": 0.1} if kind == "bert" else {}))
    enc.train()
    if kind == "bert":  # tokens at every rank position so each position embedding row is used
        ids = torch.randint(4, len(enc.vocab), (3, enc.max_len + 1))
        ids[:, 0] = enc.vocab.cls_id
        out = enc.forward_tokens(ids, torch.zeros_like(ids, dtype=torch.bool))["cls"]
    else:
        out = enc(_counts(3))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_tokens_match_numpy_tokenizer_and_encode_cells(fetched):
    anndata = pytest.importorskip("anndata")
    adata = anndata.read_zarr(fetched("scanpy-10k-subset") / "10x-10k-subset.zarr")
    X = np.asarray(adata.X[:64], dtype=np.float32)
    genes = adata.var["gene_ids"].astype(str).tolist()
    torch.manual_seed(0)
    enc = BertCellEncoder(genes=genes, width=32, depth=1, heads=2, max_len=48, out_dim=16, dropout=0.0).eval()
    with pytest.warns(UserWarning, match=r"\d+ of the encoder's 1000 genes have no median"):
        enc.fit_medians(X)  # 64 cells: many genes never expressed
    assert (enc.gene_medians == 0).sum() > 100 and (enc.gene_ids[enc.gene_medians == 0] >= 0).all()
    other = torch.from_numpy(np.asarray(adata.X[64:128], dtype=np.float32))
    no_median = enc.gene_medians == 0
    assert (other[:, no_median] > 0).any()  # expressed in other cells, but never becomes a token there
    assert not set(enc.tokens(other)[0].unique().tolist()) & set(enc.gene_ids[no_median].tolist())
    ids, pad = enc.tokenizer()(sp.csr_matrix(X), genes)
    ids_t, pad_t = enc.tokens(torch.from_numpy(X))
    assert torch.equal(ids, ids_t) and torch.equal(pad, pad_t)
    with torch.no_grad():
        direct = enc(torch.from_numpy(X))
        assert torch.allclose(enc.forward_tokens(ids, pad)["cls"], direct, atol=1e-5)
        # encode_cells aligns columns by name: a shuffled subset of genes (missing ones = 0)
        keep = np.random.default_rng(0).permutation(len(genes))[:900]
        with pytest.warns(UserWarning, match="100 of the encoder's 1000 genes are absent"):
            sub = enc.encode_cells(sp.csr_matrix(X[:, keep]), [genes[i] for i in keep], batch_size=7)
        X_zeroed = X.copy()
        X_zeroed[:, np.setdiff1d(np.arange(len(genes)), keep)] = 0
        assert torch.allclose(sub, enc(torch.from_numpy(X_zeroed)), atol=1e-5)
    with pytest.raises(ValueError, match="none of the encoder"):
        enc.encode_cells(X[:, :3], ["a", "b", "c"])


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_save_load_round_trip(kind, tmp_path):
    enc = _build(kind)
    x = _counts(6)
    folder = save_cell_encoder(enc, tmp_path / "enc")
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors"}
    back = load_cell_encoder(folder)
    assert type(back) is type(enc) and back.genes == GENES
    with torch.no_grad():
        assert torch.equal(back.eval()(x), enc(x))
    if kind == "bert":
        assert bool(back.medians_fitted) and torch.equal(back.gene_medians, enc.gene_medians)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_cell_encoder(folder)


def test_registry_and_bad_config():
    assert {"bert", "mlp"} <= set(CELL_ENCODERS)
    assert CELL_ENCODERS["bert"] is BertCellEncoder and CELL_ENCODERS["mlp"] is MLPCellEncoder
    with pytest.raises(ValueError, match="unknown cell encoder 'nope'"):
        build_cell_encoder("nope", genes=GENES)
    with pytest.raises(ValueError, match="already registered"):
        register_cell_encoder("mlp")(BertCellEncoder)
    with pytest.raises(ValueError, match="divisible"):
        build_cell_encoder("bert", genes=GENES, width=30, heads=4)
    for kind in ("bert", "mlp"):
        with pytest.raises(ValueError, match=r"expr must be \(B, 40\)"):
            _build(kind)(torch.ones(2, 5))
        with pytest.raises(ValueError, match="NaN"):
            _build(kind)(torch.full((2, 40), float("nan")))
        with pytest.raises(ValueError, match="negative"):
            _build(kind)(-torch.ones(2, 40))


@pytest.mark.parametrize("kind", ["bert", "mlp"])
def test_encode_cells_has_no_dropout_and_keeps_the_mode(kind):
    """A freshly built encoder is in train mode: ``encode_cells`` (the documented call) must not add dropout."""
    enc = _build(kind, dropout=0.5).train()
    x = _counts(6)
    first, second = enc.encode_cells(x, GENES), enc.encode_cells(x, GENES)
    assert torch.equal(first, second) and enc.training
    assert torch.allclose(first, enc.eval()(x), atol=1e-5)
