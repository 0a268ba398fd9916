"""stalign-paper: each published architecture property pinned on small hand-checked cases (Conv1d tokens,
residual-free cross-attention with LayerNorm on q and kv and no qkv bias, bottleneck FFNs, feature-axis
concatenation, flatten heads, fixed temperature), plus the model entry points and checkpoints."""
from __future__ import annotations

import json

import pytest
import torch

import stalign
from stalign.models.paper_fusion import (
    ConvTokenizer,
    FlattenHead,
    PaperABFN,
    PaperCrossAttention,
    TransformerTokenizer,
    bottleneck_ffn,
)
from stalign.models.stalign_model import STAlignConfig


def _batch(n: int = 3, g: int = 20, px: int = 32) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"spot_image": torch.randint(0, 255, (n, 3, px, px), dtype=torch.uint8),
            "niche_image": torch.randint(0, 255, (n, 3, px, px), dtype=torch.uint8),
            "spot_expr": torch.rand(n, g), "niche_expr": torch.rand(n, g)}


def test_conv1d_tokens_are_the_papers_kernel_1_and_kernel_2_convolutions() -> None:
    x = torch.arange(1.0, 5.0).view(1, 4)  # features [1, 2, 3, 4]
    tok = ConvTokenizer(in_dim=4, tokens=2, dim=4)  # kernel 1 (ResNet / scGPT 512 -> 8 x 512 in the paper)
    assert tok.conv.kernel_size == (1,) and tok.conv.stride == (1,) and tok.proj is None
    with torch.no_grad():
        tok.conv.weight.copy_(torch.tensor([2.0, -1.0]).view(2, 1, 1))
        tok.conv.bias.copy_(torch.tensor([0.5, 0.0]))
    assert torch.equal(tok(x), torch.tensor([[[2.5, 4.5, 6.5, 8.5], [-1.0, -2.0, -3.0, -4.0]]]))
    tok2 = ConvTokenizer(in_dim=4, tokens=1, dim=2)  # kernel 2, stride 2 (UNI 1024 -> 8 x 512)
    assert tok2.conv.kernel_size == (2,) and tok2.conv.stride == (2,)
    with torch.no_grad():
        tok2.conv.weight.copy_(torch.tensor([1.0, 10.0]).view(1, 1, 2))
        tok2.conv.bias.zero_()
    assert torch.equal(tok2(x), torch.tensor([[[21.0, 43.0]]]))  # 1 + 10*2, 3 + 10*4
    paper = [ConvTokenizer(in_dim=w, tokens=8, dim=512, width=v) for w, v in ((512, None), (1024, None), (2048, 512))]
    assert [tuple(t(torch.randn(2, t.proj.in_features if t.proj else t.conv.kernel_size[0] * 512)).shape)
            for t in paper] == [(2, 8, 512)] * 3
    assert paper[2].proj.weight.shape == (512, 2048)  # the paper's ResNet-50 fc 2048 -> 512
    with pytest.raises(ValueError, match="not a multiple of token_dim 512"):
        ConvTokenizer(in_dim=256, tokens=8, dim=512, what="spot_gene features")


def test_cross_attention_has_no_residual_no_qkv_bias_and_layernorm_on_q_and_kv() -> None:
    torch.manual_seed(0)
    att = PaperCrossAttention(dim=16, heads=4, dropout=0.0).eval()
    assert att.to_q.bias is None and att.to_k.bias is None and att.to_v.bias is None
    x, y = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    with torch.no_grad():
        out = att(x, y)
        assert torch.allclose(att(3.0 * x + 1.0, 0.5 * y - 2.0), out, atol=1e-5)  # LN on q and on kv
        att.to_out[0].weight.zero_()
        att.to_out[0].bias.zero_()
        assert torch.equal(att(x, y), torch.zeros_like(x))  # zero attention output -> zero: no "x +" path
    # hand-computed single head: softmax(q k^T / sqrt(d)) v with identity projections and no LayerNorm affine
    one = PaperCrossAttention(dim=2, heads=1, dropout=0.0).eval()
    with torch.no_grad():
        for lin in (one.to_q, one.to_k, one.to_v, one.to_out[0]):
            lin.weight.copy_(torch.eye(2))
        one.to_out[0].bias.zero_()
    q, kv = torch.tensor([[[1.0, -1.0]]]), torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])  # already LayerNorm'ed
    w = torch.softmax(torch.tensor([2.0, -2.0]) / 2 ** 0.5, dim=0)
    expected = w[0] * kv[0, 0] + w[1] * kv[0, 1]
    assert torch.allclose(one(q, kv)[0, 0], expected, atol=1e-4)


def test_abfn_bottleneck_ffns_feature_axis_concat_and_no_residual() -> None:
    ffn = bottleneck_ffn(512)
    assert [tuple(m.weight.shape) for m in ffn if isinstance(m, torch.nn.Linear)] == [(64, 512), (256, 64)]
    torch.manual_seed(0)
    fusion = PaperABFN(dim=16, heads=4, dropout=0.0).eval()
    img, gene = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    with torch.no_grad():
        out = fusion(img, gene)
        a = fusion.ffn_image(fusion.image_to_gene(img, gene))  # (2, 8, 8): D/2 features per token
        b = fusion.ffn_gene(fusion.gene_to_image(gene, img))
        assert a.shape == (2, 8, 8) and out.shape == (2, 8, 16)  # all 8 tokens kept, 8 + 8 features
        assert torch.allclose(out, torch.nn.functional.layer_norm(torch.cat([a, b], dim=-1), (16,)), atol=1e-6)
        for att in (fusion.image_to_gene, fusion.gene_to_image):  # zeroing both attentions: nothing of the input
            att.to_out[0].weight.zero_()                            # survives (a residual would carry it through)
            att.to_out[0].bias.zero_()
        blank = fusion(img, gene)
        assert torch.allclose(blank, fusion(torch.randn_like(img), torch.randn_like(gene)))
        assert not torch.allclose(blank, out, atol=1e-2)
    with pytest.raises(ValueError, match="one shape"):
        fusion(img, gene[:, :4])


def test_flatten_head_is_4096_2048_relu_1024_and_niche_gene_path_gives_8_tokens() -> None:
    head = FlattenHead(tokens=8, dim=512, hidden=2048, out_dim=1024)
    assert [tuple(m.weight.shape) for m in head.net if isinstance(m, torch.nn.Linear)] == [(2048, 4096), (1024, 2048)]
    assert isinstance(head.net[1], torch.nn.ReLU)
    small = FlattenHead(tokens=2, dim=3, hidden=4, out_dim=5)
    x = torch.randn(2, 2, 3)
    assert torch.allclose(small(x), small.net(x.reshape(2, 6)))  # row-major token flattening
    path = TransformerTokenizer(in_dim=10, tokens=8, dim=16, width=12, depth=1, heads=2, dim_head=4, mlp_dim=8,
                                hidden=(6,), out_hidden=5)
    assert path(torch.randn(3, 10)).shape == (3, 8, 16)


def test_stalign_paper_configs_use_the_paper_structure_and_fixed_temperature() -> None:
    from stalign.models.factory import model_config

    big = STAlignConfig.from_dict(model_config("stalign-paper"))
    assert (big.fusion, big.tokenizer, big.tokens, big.token_dim, big.heads, big.embed_dim, big.head_hidden) == (
        "paper", "conv1d", 8, 512, 8, 1024, 2048)
    assert big.spot_image.spec == "timm:resnet50" and big.niche_image.spec == "uni" and not big.learn_temperature
    assert big.tokenizer_widths == {"spot_image": 512} and big.init_temperature == 0.1
    tiny = STAlignConfig.from_dict(model_config("stalign-paper-tiny"))
    assert (tiny.fusion, tiny.tokenizer, tiny.tokens) == ("paper", "conv1d", 8)
    model = stalign.create_model("stalign-paper-tiny", n_genes=20)
    assert "logit_scale" not in dict(model.named_parameters())  # not trainable
    assert float(model.scale()) == pytest.approx(10.0)  # 1 / 0.1
    assert {type(t).__name__ for n, t in model.tokenizers.items() if n != "niche_gene"} == {"ConvTokenizer"}
    assert type(model.tokenizers["niche_gene"]).__name__ == "TransformerTokenizer"


def test_paper_model_outputs_entry_points_negatives_and_checkpoint_roundtrip(tmp_path) -> None:
    from stalign.models.factory import save_checkpoint

    torch.manual_seed(0)
    model = stalign.create_model("stalign-paper-tiny", n_genes=20, dropout=0.0).eval()
    batch = _batch()
    with torch.no_grad():
        out = model(batch)
        assert {tuple(v.shape) for k, v in out.items() if k.endswith("features")} == {(3, 64)}
        assert torch.allclose(model.encode_spot_image(batch["spot_image"]), out["spot_image_features"], atol=1e-6)
        assert model.encode_image(batch["spot_image"], batch["niche_image"]).shape == (3, 64)
        assert model.encode_gene(batch).shape == (3, 64)
        neg = {k: torch.cat([v, v.flip(0)]).view(2, 3, *v.shape[1:]).transpose(0, 1).reshape(6, *v.shape[1:])
               for k, v in batch.items() if k != "spot_image"}  # M = 2 negatives per spot: itself, then its mirror
        with_neg = model({**batch, "negatives": neg})
        assert with_neg["negative_spot_gene_features"].shape == (3, 2, 64)
        assert torch.allclose(with_neg["negative_spot_gene_features"][:, 0], out["spot_gene_features"], atol=1e-5)
        assert torch.allclose(with_neg["negative_fused_niche_features"][:, 1], out["fused_niche_features"].flip(0),
                              atol=1e-5)
        saved = stalign.load_checkpoint(save_checkpoint(model, tmp_path / "ckpt")).eval()
        assert torch.allclose(saved(batch)["fused_spot_features"], out["fused_spot_features"], atol=1e-6)
    meta = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert meta["config"]["fusion"] == "paper" and meta["config"]["learn_temperature"] is False


@pytest.mark.parametrize("overrides, message", [
    ({"fusion": "nope"}, "unknown fusion"), ({"tokenizer": "pool"}, "unknown tokenizer"),
    ({"tokenizer_widths": {"spot": 4}}, "unknown sides"), ({"niche_gene_tokenizer": {"layers": 2}}, "unknown keys"),
    ({"gene": {"encoder_kwargs": {"out_dim": 48}}}, "spot_gene features are 48 wide, not a multiple of token_dim 32"),
])
def test_bad_paper_settings_are_one_line_errors(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        stalign.create_model("stalign-paper-tiny", n_genes=20, **overrides)


def test_project_configs_keep_their_structure() -> None:
    cfg = STAlignConfig.from_dict({"tokens": 4, "token_dim": 32, "embed_dim": 32})  # an old checkpoint's config
    assert (cfg.fusion, cfg.tokenizer, cfg.learn_temperature) == ("project", "linear", True)
    model = stalign.create_model("stalign-tiny", n_genes=20)
    assert "logit_scale" in dict(model.named_parameters()) and not hasattr(model, "fusion_heads")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_equal_the_published_modules_at_paper_sizes() -> None:
    # Worked out layer by layer from the published code (model/stalign.py) at 512-wide tokens:
    cross = 3 * 512 * 512 + (512 * 512 + 512) + 2 * (2 * 512)         # to_q/k/v (no bias), to_out, norm_q + norm_kv
    ffn = (512 * 64 + 64) + (64 * 256 + 256)                          # 512 -> 64 -> 256
    assert _count(PaperABFN(dim=512, heads=8)) == 2 * cross + 2 * ffn + 2 * 512 == 2_202_240  # + ln_fuse
    assert _count(FlattenHead(tokens=8, dim=512, hidden=2048, out_dim=1024)) == (
        (4096 * 2048 + 2048) + (2048 * 1024 + 1024)) == 10_488_832
    mlp = (4384 * 1024 + 1024) + (1024 * 512 + 512) + (512 * 8 * 548 + 8 * 548)  # Flatten3DTo2D
    layer = 2 * (2 * 548) + 548 * 3 * 512 + (512 * 548 + 548) + (548 * 1024 + 1024) + (1024 * 548 + 548)
    out = (548 * 256 + 256) + (256 * 512 + 512)                                    # MLPReshapeTo512
    path = TransformerTokenizer(in_dim=4384, tokens=8, dim=512)  # the paper's defaults: 548 wide, depth 6, 8 x 64
    assert _count(path) == mlp + 6 * layer + out == 21_029_680
    assert _count(ConvTokenizer(in_dim=1024, tokens=8, dim=512)) == 8 * 2 + 8  # ConvUNI: Conv1d(1, 8, 2, stride 2)
