"""ABFN: shapes, key padding masks, both directions really attend, token and pooling helpers."""
from __future__ import annotations

import pytest
import torch

from stalign.models.abfn import ABFN, CrossAttentionBlock, Tokenizer, masked_mean


def _abfn() -> ABFN:
    torch.manual_seed(0)
    return ABFN(dim=16, out_dim=8, heads=4, dropout=0.1).eval()


def test_shapes() -> None:
    m = _abfn()
    img, gene = torch.randn(3, 4, 16), torch.randn(3, 6, 16)
    fused, pad = m.fuse_tokens(img, gene)
    assert fused.shape == (3, 10, 16) and pad.shape == (3, 10) and not pad.any()
    assert m(img, gene).shape == (3, 8)
    with pytest.raises(ValueError, match="share B and D"):
        m(img, torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="divisible"):
        CrossAttentionBlock(dim=10, heads=4)


def test_padded_tokens_do_not_change_the_output() -> None:
    m = _abfn()
    img, gene = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    gene_pad = torch.zeros(2, 6, dtype=torch.bool)
    gene_pad[:, 4:] = True
    img_pad = torch.zeros(2, 4, dtype=torch.bool)
    img_pad[1, 3] = True
    gene2, img2 = gene.clone(), img.clone()
    gene2[:, 4:] = 100 * torch.randn(2, 2, 16)
    img2[1, 3] = 50.0
    with torch.no_grad():
        a = m(img, gene, img_pad, gene_pad)
        b = m(img2, gene2, img_pad, gene_pad)
        c = m(img2, gene2)  # without masks the junk tokens matter
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)


def test_each_stream_reads_the_other_modality() -> None:
    m = _abfn()
    img, gene = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        fused, _ = m.fuse_tokens(img, gene)
        fused_g, _ = m.fuse_tokens(img, gene + torch.randn_like(gene))
        fused_i, _ = m.fuse_tokens(img + torch.randn_like(img), gene)
    # image-query stream (first 4 tokens) changes when only the gene tokens change, and vice versa
    assert (fused[:, :4] - fused_g[:, :4]).abs().max() > 1e-3
    assert (fused[:, 4:] - fused_i[:, 4:]).abs().max() > 1e-3


def test_masked_mean_and_tokenizer() -> None:
    x = torch.tensor([[[1.0], [3.0], [100.0]]])
    pad = torch.tensor([[False, False, True]])
    assert masked_mean(x, pad).item() == pytest.approx(2.0)
    assert masked_mean(x, None).item() == pytest.approx(104 / 3)
    tok = Tokenizer(in_dim=5, tokens=8, dim=12)
    assert tok(torch.randn(3, 5)).shape == (3, 8, 12)
