"""Image encoder registry: real EfficientNet-Lite0 ImageNet weights, local-file loaders (UNI, CONCH, Phikon,
plain checkpoints), uint8 normalisation inside, transforms, LoRA / freezing, unknown names."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stalign.models.adapters import LoRALinear, apply_lora, merge_lora
from stalign.models.image_encoders import (
    CheckpointMismatchError,
    UnknownImageEncoderError,
    create_image_encoder,
    load_state_dict_file,
)

SMALL_VIT = {"embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32}


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------- EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0_file(fetched) -> Path:
    return fetched("efficientnet-lite0") / "efficientnet-lite0-57934424.pth"


def _center_224(img) -> torch.Tensor:
    import torch.nn.functional as F

    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
    h, w = x.shape[-2:]
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].float()
    return F.interpolate(x, size=224, mode="bicubic", antialias=True).clamp(0, 255).round().to(torch.uint8)


def test_efficientnet_lite0_real_weights_map_and_predict(lite0_file: Path) -> None:
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    from stalign.models.pathology_encoders import efficientnet_lite0_imagenet

    src = load_state_dict_file(lite0_file)
    model = efficientnet_lite0_imagenet(lite0_file).eval()
    own = model.state_dict()
    assert len(own) == len(src) == 296
    for (k_own, t_own), (k_src, t_src) in zip(own.items(), src.items()):  # every fetched tensor sits in the model
        assert torch.equal(t_own, t_src), (k_own, k_src)

    enc = create_image_encoder("efficientnet-lite0", pretrained=lite0_file).eval()
    assert enc.out_dim == 1280 and enc.input_size == 224 and enc.mean == (0.5, 0.5, 0.5)
    info = ImageNetInfo()
    x = torch.cat([_center_224(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")])
    with torch.no_grad():
        feats = enc(x)  # the encoder's pooled features + the file's classifier = the full ImageNet model
        probs = model.get_classifier()(feats).softmax(-1)
        assert torch.allclose(probs[:1], model(enc.preprocess(x[:1])).softmax(-1), atol=1e-5)
    assert (probs.max(-1).values > 0.15).all()  # far from the uniform 0.001 of an untrained classifier
    top = {name: [info.index_to_description(int(i)) for i in p.topk(5).indices]
           for name, p in zip(("china.jpg", "flower.jpg"), probs)}
    assert "palace" in top["china.jpg"][:3], top  # a Chinese palace photo
    assert "daisy" in top["flower.jpg"][:3], top  # a flower close-up


# ------------------------------------------------------------------------------- UNI, CONCH, Phikon files
def test_uni_loads_a_local_checkpoint_with_its_kwargs(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0, init_values=1e-5,
                            dynamic_img_size=True, patch_size=16, **SMALL_VIT).eval()
    f = tmp_path / "uni.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    enc = create_image_encoder("uni", pretrained=f, **{k: v for k, v in SMALL_VIT.items()}).eval()
    x = _images()
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(_normalise(x, enc.mean, enc.std)), atol=1e-5)
    assert enc.mean == (0.485, 0.456, 0.406) and enc.out_dim == 64
    same = create_image_encoder(str(f), arch="uni", **SMALL_VIT).eval()  # bare path + arch
    with torch.no_grad():
        assert torch.allclose(same(x), enc(x))
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        create_image_encoder("uni", pretrained=f, embed_dim=32, depth=2, num_heads=2, img_size=32)


def test_conch_loads_a_conch_package_checkpoint(tmp_path: Path) -> None:
    """A state dict in the layout of MahmoodLab/conch's pytorch_model.bin (CONCH's CoCa: ``visual.trunk`` timm
    ViT, ``visual.attn_pool_contrast``, ``visual.ln_contrast``, plus projection, captioning and text weights)."""
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    torch.manual_seed(0)
    vit = VisionTransformer(embed_dim=64, depth=1, num_heads=2, img_size=32, patch_size=16, num_classes=0,
                            dynamic_img_size=True).eval()
    mha = nn.MultiheadAttention(32, 4, kdim=64, vdim=64, batch_first=True).eval()
    query, ln_q, ln_k, ln_c = torch.randn(1, 32), nn.LayerNorm(32), nn.LayerNorm(64), nn.LayerNorm(32)
    for ln in (ln_q, ln_k, ln_c):
        nn.init.normal_(ln.weight)
        nn.init.normal_(ln.bias)
    sd = {f"visual.trunk.{k}": v for k, v in vit.state_dict().items()}
    sd |= {f"visual.attn_pool_contrast.attn.{k}": v for k, v in mha.state_dict().items()}
    sd |= {"visual.attn_pool_contrast.query": query, "visual.proj_contrast": torch.randn(32, 32),
           "visual.attn_pool_caption.query": torch.randn(8, 64), "visual.ln_caption.weight": torch.ones(64),
           "text.token_embedding.weight": torch.randn(10, 16), "logit_scale": torch.tensor(2.0)}
    for name, ln in (("attn_pool_contrast.ln_q", ln_q), ("attn_pool_contrast.ln_k", ln_k), ("ln_contrast", ln_c)):
        sd |= {f"visual.{name}.{k}": v for k, v in ln.state_dict().items()}
    f = tmp_path / "pytorch_model.bin"
    torch.save(sd, f)
    enc = create_image_encoder("conch", pretrained=f, width=64, depth=1, heads=2, image_size=32, embed_dim=32,
                               pool_heads=4).eval()
    assert enc.out_dim == 32 and enc.input_size == 32 and enc.interpolation == "bicubic"
    assert enc.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    x = _images()
    with torch.no_grad():
        kv = ln_k(vit.forward_features(_normalise(x, enc.mean, enc.std)))
        pooled = mha(ln_q(query)[None].expand(2, -1, -1), kv, kv, need_weights=False)[0][:, 0]
        assert torch.allclose(enc(x), ln_c(pooled), atol=1e-5)
    del sd["visual.ln_contrast.weight"]
    torch.save(sd, f)
    with pytest.raises(CheckpointMismatchError, match="ln_contrast.weight"):
        create_image_encoder("conch", pretrained=f, width=64, depth=1, heads=2, image_size=32, embed_dim=32,
                             pool_heads=4)


def test_open_clip_tower_loads_a_whole_model_or_visual_only_file(tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                           "patch_size": 16},
           "text_cfg": {"width": 32, "heads": 2, "layers": 1, "vocab_size": 64}}
    ref = open_clip.create_model("ViT-B-32", pretrained=None, **cfg).eval()
    whole, visual_only = tmp_path / "clip.pth", tmp_path / "visual.safetensors"
    torch.save(ref.state_dict(), whole)
    save_file({k: v.contiguous() for k, v in ref.visual.state_dict().items()}, str(visual_only))
    x = _images()
    for f in (whole, visual_only):
        enc = create_image_encoder("open_clip:ViT-B-32", pretrained=f, **cfg).eval()
        assert enc.out_dim == 32 and enc.input_size == 32
        with torch.no_grad():
            assert torch.allclose(enc(x), ref.visual(_normalise(x, enc.mean, enc.std)), atol=1e-5)


def _timm_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the loader's mapping, written independently: timm ViT -> transformers ViTModel keys."""
    out = {"vit.embeddings.cls_token": sd["cls_token"], "vit.embeddings.position_embeddings": sd["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "vit.layernorm.weight": sd["norm.weight"], "vit.layernorm.bias": sd["norm.bias"]}
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        hf, tm = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{tm}attn.qkv.{p}"].chunk(3, dim=0)
            out[f"{hf}attention.attention.query.{p}"] = q
            out[f"{hf}attention.attention.key.{p}"] = k
            out[f"{hf}attention.attention.value.{p}"] = v
            out[f"{hf}attention.output.dense.{p}"] = sd[f"{tm}attn.proj.{p}"]
            out[f"{hf}layernorm_before.{p}"] = sd[f"{tm}norm1.{p}"]
            out[f"{hf}layernorm_after.{p}"] = sd[f"{tm}norm2.{p}"]
            out[f"{hf}intermediate.dense.{p}"] = sd[f"{tm}mlp.fc1.{p}"]
            out[f"{hf}output.dense.{p}"] = sd[f"{tm}mlp.fc2.{p}"]
        i += 1
    return out


def test_phikon_remaps_transformers_keys(tmp_path: Path) -> None:
    from functools import partial

    import timm

    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, embed_dim=128, depth=2,
                            num_heads=2, img_size=32, norm_layer=partial(torch.nn.LayerNorm, eps=1e-12)).eval()
    f = tmp_path / "pytorch_model.bin"
    torch.save(_timm_to_hf(ref.state_dict()), f)
    enc = create_image_encoder("phikon", pretrained=f, img_size=32, num_heads=2).eval()
    assert enc.out_dim == 128 and enc.mean == (0.485, 0.456, 0.406)
    x = _images()
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(_normalise(x, enc.mean, enc.std)), atol=1e-5)
    bad = tmp_path / "not_hf.bin"
    torch.save(ref.state_dict(), bad)
    with pytest.raises(CheckpointMismatchError, match="not a transformers ViT"):
        create_image_encoder("phikon", pretrained=bad)
    snapshot = tmp_path / "snapshot"  # a Hugging Face snapshot folder works as the path too
    snapshot.mkdir()
    f.rename(snapshot / "pytorch_model.bin")
    from_dir = create_image_encoder("phikon", pretrained=snapshot, img_size=32, num_heads=2).eval()
    with torch.no_grad():
        assert torch.allclose(from_dir(x), ref(_normalise(x, enc.mean, enc.std)), atol=1e-5)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="none of the weight files"):
        create_image_encoder("phikon", pretrained=empty)


def test_local_checkpoint_path_needs_arch_and_loads(tmp_path: Path) -> None:
    import timm

    ref = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    f = tmp_path / "resnet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, f)
    enc = create_image_encoder(str(f), arch="timm:test_resnet", input_size=32).eval()  # head dropped, prefix stripped
    x = _images()
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(_normalise(x, enc.mean, enc.std)), pre_logits=True)
        assert torch.allclose(enc(x), want, atol=1e-5)
    with pytest.raises(ValueError, match="needs its architecture"):
        create_image_encoder(str(f))
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_image_encoder(str(tmp_path / "missing.safetensors"), arch="timm:test_resnet")


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(UnknownImageEncoderError) as err:
        create_image_encoder("resnet-9000")
    msg = str(err.value)
    for name in ("uni", "uni2", "virchow2", "h-optimus-0", "conch", "phikon", "efficientnet-lite0", "timm:<name>",
                 "open_clip:<name>"):
        assert name in msg


# ------------------------------------------------------------------------------- preprocessing, pooling
def test_uint8_normalised_inside_and_transforms() -> None:
    enc = create_image_encoder("timm:test_vit", img_size=32).eval()
    x = _images(size=48)
    with torch.no_grad():
        a, b = enc(x), enc(x.float() / 255)
    assert torch.allclose(a, b, atol=1e-5)  # uint8 and [0, 1] floats are the same image
    assert enc.preprocess(x).shape[-1] == 32  # resized to the backbone's input size
    for t in (enc.train_transform(), enc.eval_transform()):
        y = t(x[0])
        assert y.dtype == torch.uint8 and tuple(y.shape) == (3, 32, 32)


def test_virchow_pools_cls_and_mean_patch_tokens() -> None:
    enc = create_image_encoder("virchow2", embed_dim=96, depth=1, num_heads=2, img_size=28).eval()
    assert enc.out_dim == 192
    x = _images(size=28)
    with torch.no_grad():
        tokens = enc.trunk.vit.forward_features(enc.preprocess(x))
        assert tokens.shape[1] == 1 + 4 + 4  # CLS + 4 registers + 2x2 patches
        want = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], -1)
        assert torch.allclose(enc(x), want, atol=1e-6)


# ------------------------------------------------------------------------------- adapters
def test_lora_equals_base_at_init_and_merges_exactly() -> None:
    enc = create_image_encoder("timm:test_vit", img_size=32).eval()
    x = _images()
    with torch.no_grad():
        base = enc(x)
    n = apply_lora(enc.trunk, rank=4)
    assert n > 0
    trainable = [name for name, p in enc.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        assert torch.allclose(enc(x), base, atol=1e-6)  # B = 0 at init
        for m in enc.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(std=0.1)
        adapted = enc(x)
    assert not torch.allclose(adapted, base, atol=1e-4)
    merge_lora(enc.trunk)
    assert not any(isinstance(m, LoRALinear) for m in enc.modules())
    with torch.no_grad():
        assert torch.allclose(enc(x), adapted, atol=1e-5)


def test_freeze_and_unfreeze_last_blocks() -> None:
    frozen = create_image_encoder("timm:test_vit", img_size=32, freeze=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    part = create_image_encoder("timm:test_vit", img_size=32, unfreeze_last=1)
    trainable = {n for n, p in part.named_parameters() if p.requires_grad}
    last = len(part.trunk.blocks) - 1
    assert any(n.startswith(f"trunk.blocks.{last}.") for n in trainable)
    assert not any(n.startswith(("trunk.blocks.0.", "trunk.patch_embed")) for n in trainable)
    assert "trunk.norm.weight" in trainable  # final norm after the blocks trains too
    with pytest.raises(ValueError, match="LoRA found no"):
        create_image_encoder("timm:test_efficientnet", lora_rank=4)


def test_frozen_batchnorm_keeps_its_statistics_in_train_mode() -> None:
    cnn = create_image_encoder("timm:test_efficientnet", input_size=32, unfreeze_last=1).train()
    first, last = cnn.trunk.bn1, cnn.trunk.bn2  # stem BN (frozen), head BN (after the blocks: trains)
    before = first.running_mean.clone(), last.running_mean.clone()
    cnn(_images(n=4))
    assert not first.training and torch.equal(first.running_mean, before[0])
    assert last.training and not torch.equal(last.running_mean, before[1])
