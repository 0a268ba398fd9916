"""HEST-Bench's encoder zoo (issue 28): ResNet-50 truncated after layer3, Phikon-v2, GigaPath, CTransPath, H0-mini,
H-optimus-1, each against a reference implementation with the same random weights, loaded strictly from files in the
publisher's layout; full-size architectures checked on the meta device; the precision label of bench rows."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from stalign.models.image_encoders import (
    ALIASES,
    CheckpointMismatchError,
    create_image_encoder,
    run_precision,
)

HOPT_MEAN, HOPT_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Noise on every parameter and BatchNorm statistic, so that no constant init (zero biases, unit norms, tiny
    layer scales, fresh running statistics) hides a wiring error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.add_(torch.randn(t.shape, generator=g) * 0.05)


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


# ------------------------------------------------------------------------------------------ ResNet-50
def test_resnet50_trunc_is_torchvision_resnet50_through_layer3_and_average_pool(tmp_path: Path) -> None:
    """One bottleneck per stage (the full depth is checked on the meta device below)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    ref = ResNet(Bottleneck, [1, 1, 1, 1]).eval()
    _randomise(ref)
    f = tmp_path / "resnet50-tv.pth"  # torchvision's whole-network state dict (layer4 and fc included)
    torch.save(ref.state_dict(), f)
    enc = create_image_encoder("resnet50_trunc", pretrained=f, layers=[1, 1, 1, 1]).eval()
    assert enc.out_dim == 1024 and enc.mean == IMAGENET_MEAN and enc.std == IMAGENET_STD and enc.precision == "fp32"
    x = _images(size=224)
    with torch.no_grad():
        h = _normalise(x, IMAGENET_MEAN, IMAGENET_STD)
        for layer in (ref.conv1, ref.bn1, ref.relu, ref.maxpool, ref.layer1, ref.layer2, ref.layer3):
            h = layer(h)
        want = torch.nn.AdaptiveAvgPool2d(1)(h).flatten(1)
        assert torch.allclose(enc(x), want, atol=1e-5, rtol=1e-4)
    sd = ref.state_dict()
    del sd["layer3.0.bn3.running_mean"]
    torch.save(sd, f)
    with pytest.raises(CheckpointMismatchError, match="layer3.0.bn3.running_mean"):
        create_image_encoder("resnet50_trunc", pretrained=f, layers=[1, 1, 1, 1])


def test_resnet50_names_say_which_network() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = create_image_encoder("resnet50")
    assert old.out_dim == 2048 and old.spec == "timm:resnet50.tv_in1k"
    assert any(issubclass(w.category, FutureWarning) and "resnet50_trunc" in str(w.message) for w in caught)
    assert ALIASES["resnet50-full"] == "timm:resnet50.tv_in1k"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unambiguous names do not warn
        assert create_image_encoder("resnet50-full").out_dim == 2048
        assert create_image_encoder("resnet50_trunc").out_dim == 1024


# ------------------------------------------------------------------------------------------ Phikon-v2
def _dinov2_published_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5 names Dinov2 attention q/k/v/o_proj; the published file (transformers 4) spells them
    ``attention.attention.query`` ... ``attention.output.dense``."""
    names = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
             "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense"}
    out = {}
    for k, v in sd.items():
        for new, old in names.items():
            k = k.replace(new, old)
        out[k] = v
    return out


def test_phikon_v2_equals_transformers_dinov2_model(tmp_path: Path) -> None:
    import json

    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=16,
                       layerscale_value=0.5, layer_norm_eps=1e-6)
    ref = Dinov2Model(cfg).eval()
    _randomise(ref)
    snapshot = tmp_path / "phikon-v2"
    snapshot.mkdir()
    sd = _dinov2_published_keys(ref.state_dict())
    assert "encoder.layer.0.attention.attention.query.weight" in sd and "embeddings.mask_token" in sd
    _save(sd, snapshot / "model.safetensors")
    (snapshot / "config.json").write_text(json.dumps(cfg.to_dict()))
    enc = create_image_encoder("phikon-v2", pretrained=snapshot).eval()
    assert enc.out_dim == 64 and enc.input_size == 32 and enc.mean == IMAGENET_MEAN and enc.precision == "fp32"
    x = _images()
    with torch.no_grad():
        want = ref(pixel_values=_normalise(x, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state[:, 0]
        assert torch.allclose(enc(x), want, atol=1e-5)
    del sd["encoder.layer.1.layer_scale2.lambda1"]
    _save(sd, snapshot / "model.safetensors")
    with pytest.raises(CheckpointMismatchError, match="layer_scale2"):
        create_image_encoder("phikon-v2", pretrained=snapshot)


# ------------------------------------------------------------------------------------------ CTransPath
def _old_swin_layout(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """timm >= 0.6 Swin keys -> timm 0.5.4's (TransPath's ``ctranspath.pth``): each stage's downsampling moves to the
    end of the stage before, and the persistent ``relative_position_index`` / ``attn_mask`` buffers appear."""
    import re

    out = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
           for k, v in sd.items()}
    for name, m in model.named_modules():
        if hasattr(m, "relative_position_index"):
            out[f"{name}.relative_position_index"] = m.relative_position_index
        if getattr(m, "attn_mask", None) is not None:
            out[f"{name}.attn_mask"] = m.attn_mask
    return out


#: Swin-T's structure (4 stages, shifted windows of 7 at 224 px) at a quarter of its width and fewer blocks.
SMALL_SWIN = {"embed_dim": 32, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}


def test_ctranspath_loads_the_transpath_checkpoint_layout(tmp_path: Path) -> None:
    built = create_image_encoder("ctranspath", **SMALL_SWIN).eval()
    _randomise(built.trunk)
    old = _old_swin_layout(built.trunk.state_dict(), built.trunk)
    assert "layers.0.downsample.reduction.weight" in old and "layers.0.blocks.1.attn_mask" in old
    assert "patch_embed.proj.6.weight" in old and "patch_embed.norm.weight" in old  # the ConvStem
    f = tmp_path / "ctranspath.pth"
    torch.save({"model": old}, f)
    enc = create_image_encoder("ctranspath", pretrained=f, **SMALL_SWIN).eval()
    assert enc.out_dim == 256 and enc.input_size == 224 and enc.mean == IMAGENET_MEAN
    x = _images(size=224)
    with torch.no_grad():
        assert torch.allclose(enc(x), built(x), atol=1e-5)
    del old["layers.2.blocks.1.mlp.fc2.bias"]
    torch.save({"model": old}, f)
    with pytest.raises(CheckpointMismatchError, match="layers.2.blocks.1.mlp.fc2.bias"):
        create_image_encoder("ctranspath", pretrained=f, **SMALL_SWIN)


def test_ctranspath_equals_transpath_code(tmp_path: Path) -> None:
    """Against TransPath's own model (``ctran.py`` on timm 0.5.4, the ``timm_ctp`` package HEST installs)."""
    pytest.importorskip("timm_ctp")
    from stalign.models.pathology_zoo import ConvStem

    class OldConvStem(ConvStem):  # TransPath's ConvStem returns (B, N, C) tokens to the old Swin
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.proj(x).flatten(2).transpose(1, 2))

    def old_swin():  # timm_ctp's swin_tiny_patch4_window7_224 with SMALL_SWIN's widths and depths
        from timm_ctp.models.swin_transformer import SwinTransformer

        return SwinTransformer(img_size=224, patch_size=4, window_size=7, embed_layer=OldConvStem, num_classes=0,
                               **SMALL_SWIN).eval()

    ref, fresh = old_swin(), dict(old_swin().named_buffers())
    _randomise(ref)
    for name, buf in ref.named_buffers():  # the integer index and the mask are not weights
        if name.endswith(("attn_mask", "relative_position_index")):
            buf.copy_(fresh[name])
    f = tmp_path / "ctranspath.pth"
    torch.save({"model": ref.state_dict()}, f)
    enc = create_image_encoder("ctranspath", pretrained=f, **SMALL_SWIN).eval()
    x = _images(size=224)
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(_normalise(x, IMAGENET_MEAN, IMAGENET_STD)), atol=1e-4)


# ------------------------------------------------------------------------------------------ GigaPath
def test_gigapath_is_timm_dinov2_giant_with_hest_resize_and_crop(tmp_path: Path) -> None:
    import timm
    import torchvision.transforms.v2 as T

    small = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}
    ref = timm.create_model("vit_giant_patch14_dinov2", pretrained=False, num_classes=0, img_size=224, in_chans=3,
                            patch_size=16, init_values=1e-5, **small).eval()
    _randomise(ref)
    enc = create_image_encoder("gigapath", pretrained=_save(ref.state_dict(), tmp_path / "gigapath.safetensors"),
                               **small).eval()
    assert enc.out_dim == 64 and enc.precision == "fp32"
    x = _images(size=224)
    # HEST resizes the uint8 PIL image (rounding to 1/255); here the resize runs on floats
    hest = T.Compose([T.ToDtype(torch.float32, scale=True), T.Resize(256, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(224), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    with torch.no_grad():
        assert torch.allclose(enc.preprocess(x), hest(x), atol=1e-5)
        assert torch.allclose(enc(x), ref(hest(x)), atol=1e-5)


# ------------------------------------------------------------------------------------------ H0-mini
def test_h0_mini_pools_as_its_model_card_and_hest(tmp_path: Path) -> None:
    import timm

    ref = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, global_pool="",
                            img_size=28, embed_dim=64, depth=1, num_heads=2, mlp_ratio=3.0,
                            mlp_layer=timm.layers.SwiGLUPacked, act_layer=torch.nn.SiLU).eval()
    _randomise(ref)
    f = _save(ref.state_dict(), tmp_path / "h0-mini.safetensors")
    kw = {"embed_dim": 64, "depth": 1, "num_heads": 2, "img_size": 28}
    card = create_image_encoder("h0-mini", pretrained=f, **kw).eval()  # SwiGLU width read off the file
    hest = create_image_encoder("h0_mini", pretrained=f, **kw).eval()
    assert card.out_dim == 128 and hest.out_dim == 64 and card.mean == HOPT_MEAN and card.std == HOPT_STD
    assert card.precision == hest.precision == "fp16"
    x = _images(size=28)
    with torch.no_grad():
        out = ref(_normalise(x, HOPT_MEAN, HOPT_STD))  # (B, 1 + 4 + 4, D), as the card's model(x)
        assert torch.allclose(card(x), torch.cat([out[:, 0], out[:, ref.num_prefix_tokens:].mean(1)], -1), atol=1e-5)
        assert torch.allclose(hest(x), out[:, 0], atol=1e-5)


# ------------------------------------------------------------------------------------------ H-optimus-1
def test_h_optimus_1_is_h_optimus_0s_architecture(tmp_path: Path) -> None:
    import timm

    small = {"embed_dim": 64, "depth": 1, "num_heads": 2, "img_size": 28, "mlp_ratio": 4.0}
    ref = timm.create_model("vit_giant_patch14_reg4_dinov2", pretrained=False, num_classes=0, init_values=1e-5,
                            **small).eval()
    _randomise(ref)
    enc = create_image_encoder("hoptimus1", pretrained=_save(ref.state_dict(), tmp_path / "h1.safetensors"),
                               **small).eval()
    assert enc.mean == HOPT_MEAN and enc.std == HOPT_STD and enc.precision == "fp16" and enc.out_dim == 64
    x = _images(size=28)
    with torch.no_grad():
        assert torch.allclose(enc(x), ref(_normalise(x, HOPT_MEAN, HOPT_STD)), atol=1e-5)


# ------------------------------------------------------------------------------------------ full size
@pytest.mark.parametrize("name, dim, n_params, shapes", [
    ("gigapath", 1536, 1_134_953_984, {"pos_embed": (1, 197, 1536), "patch_embed.proj.weight": (1536, 3, 16, 16),
                                       "blocks.39.mlp.fc1.weight": (8192, 1536)}),
    ("h-optimus-1", 1536, 1_134_774_272, {"reg_token": (1, 4, 1536), "pos_embed": (1, 256, 1536)}),
    ("h0-mini", 1536, 85_739_520, {"reg_token": (1, 4, 768), "blocks.11.mlp.fc1.weight": (4096, 768),
                                   "blocks.11.mlp.fc2.weight": (768, 2048)}),
    ("phikon-v2", 1024, 303_350_784, {"pos_embed": (1, 197, 1024), "blocks.23.ls2.gamma": (1024,)}),
    ("ctranspath", 768, 27_520_038, {"patch_embed.proj.0.weight": (12, 3, 3, 3), "head.fc.weight": None}),
    ("resnet50_trunc", 1024, 8_543_296, {"features.layer3.5.conv3.weight": (1024, 256, 1, 1)}),
])
def test_published_sizes_on_the_meta_device(name: str, dim: int, n_params: int, shapes: dict) -> None:
    """The whole architectures (GigaPath 1.13B, H0-mini 85.7M, CTransPath 28M parameters, as published), unallocated."""
    with torch.device("meta"):
        enc = create_image_encoder(name)
    sd = {k.removeprefix("vit."): v for k, v in enc.trunk.state_dict().items()}
    assert enc.out_dim == dim and sum(p.numel() for p in enc.parameters()) == n_params
    for key, shape in shapes.items():
        assert (tuple(sd[key].shape) if key in sd else None) == shape, key


# ------------------------------------------------------------------------------------------ precision
def test_run_precision_labels() -> None:
    assert run_precision("fp16", "auto", "cuda") == ("fp16", "fp16 autocast")
    assert run_precision("fp32", "auto", "cpu") == ("fp32", "fp32")
    assert run_precision("fp16", "auto", "cpu") == ("fp32", "fp32 (no fp16 autocast on CPU; reference: fp16 autocast)")
    assert run_precision("fp16", "fp32", "cuda") == ("fp32", "fp32 (asked fp32; reference: fp16 autocast)")
    assert run_precision("fp32", "fp16", "cuda") == ("fp16", "fp16 autocast (asked fp16; reference: fp32)")
    assert run_precision("bf16", "auto", "cpu") == ("bf16", "bf16 autocast")
    with pytest.raises(ValueError, match="precision must be one of"):
        run_precision("fp16", "fp8", "cpu")


def test_registry_precision_follows_hest() -> None:
    """HEST's inference_models.py: UNI, Virchow2, H-optimus-0, H0-mini fp16; the others fp32 (UNI2 bf16 and
    H-optimus-1 fp16 from TRIDENT, which HEST lacks)."""
    from stalign.models.backbones import IMAGE_ENCODERS

    want = {"uni": "fp16", "virchow2": "fp16", "h-optimus-0": "fp16", "h0-mini": "fp16", "h-optimus-1": "fp16",
            "uni2": "bf16", "virchow": "fp32", "conch": "fp32", "phikon": "fp32", "phikon-v2": "fp32",
            "gigapath": "fp32", "ctranspath": "fp32", "resnet50_trunc": "fp32"}
    assert {name: IMAGE_ENCODERS[name].precision for name in want} == want
    with torch.device("meta"):  # what the registry entry says is what the built encoder carries
        assert create_image_encoder("uni").precision == "fp16"
        assert create_image_encoder("timm:resnet50.tv_in1k").precision == "fp32"


# ------------------------------------------------------------------------------------------ --hest-bench
def _tiny_task(root: Path, *, n: int = 16, size: int = 32, genes: int = 3) -> Path:
    """A HEST-Bench task folder: two samples of n random patches, random counts, two leave-one-out splits."""
    import json

    import anndata as ad
    import numpy as np

    from stalign.data.hest_bench_io import write_patches

    rng = np.random.default_rng(0)
    names = [f"G{j}" for j in range(genes)]
    for sid in ("S1", "S2"):
        barcodes = [f"{sid}-{i}" for i in range(n)]
        write_patches(root / "patches" / f"{sid}.h5", rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                      barcodes, rng.uniform(0, 1000, (n, 2)))
        (root / "adata").mkdir(parents=True, exist_ok=True)
        a = ad.AnnData(rng.poisson(5, (n, genes)).astype(np.float32))
        a.obs_names, a.var_names = barcodes, names
        a.write_h5ad(root / "adata" / f"{sid}.h5ad")
    (root / "var_50genes.json").write_text(json.dumps({"genes": names}))
    (root / "splits").mkdir()
    for name, sid in (("train_0", "S1"), ("test_0", "S2"), ("train_1", "S2"), ("test_1", "S1")):
        row = f"{sid},patches/{sid}.h5,adata/{sid}.h5ad"
        (root / "splits" / f"{name}.csv").write_text(f"sample_id,patches_path,expr_path\n{row}\n")
    return root


def test_hest_bench_features_of_resnet50_trunc_are_hests(tmp_path: Path) -> None:
    """The features ``--hest-bench`` computes for ``resnet50_trunc`` equal HEST's ``ResNet50InferenceEncoder``:
    timm ``resnet50`` ``features_only`` ``out_indices=[3]`` + ``AdaptiveAvgPool2d(1)`` on ToTensor + ImageNet
    Normalize of the 224 px patches (one bottleneck per stage here; same weights file)."""
    import timm

    from stalign.data.hest_bench_io import read_patches
    from stalign.tasks.hest_bench import patch_features

    root = _tiny_task(tmp_path / "IDC", n=2, size=224)
    hest = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=[3], num_classes=0,
                             layers=[1, 1, 1, 1]).eval()
    _randomise(hest)
    f = _save(hest.state_dict(), tmp_path / "resnet50.safetensors")
    enc = create_image_encoder("resnet50_trunc", pretrained=f, layers=[1, 1, 1, 1]).eval()
    ours = patch_features(enc, root / "patches" / "S1.h5", batch_size=2, progress=False)
    img, _ = read_patches(root / "patches" / "S1.h5")
    with torch.no_grad():
        x = _normalise(torch.from_numpy(img).permute(0, 3, 1, 2), IMAGENET_MEAN, IMAGENET_STD)
        want = torch.nn.AdaptiveAvgPool2d(1)(hest(x)[0]).squeeze(-1).squeeze(-1).numpy()
    assert ours.shape == (2, 1024)
    assert abs(ours - want).max() < 1e-4 * max(1.0, abs(want).max())
    with torch.no_grad():  # the precision reaches the model: bf16 autocast changes the features a little
        bf16 = patch_features(enc, root / "patches" / "S1.h5", batch_size=2, progress=False, precision="bf16")
    assert 0 < abs(bf16 - ours).max() < 0.1 * abs(ours).max()


def test_hest_bench_rows_state_the_precision(tmp_path: Path, capsys) -> None:
    import pandas as pd

    from stalign.cli import main

    root = _tiny_task(tmp_path / "IDC")
    assert main(["bench", "--hest-bench", str(root), "--encoders", "random:timm:test_resnet", "--latent-dim", "4",
                 "--quiet", "--device", "cpu", "--precision", "fp16", "--out", str(tmp_path / "rows.csv")]) == 0
    rows = pd.read_csv(tmp_path / "rows.csv")
    enc = rows[rows["kind"] == "encoder"].iloc[0]
    assert enc["encoder"] == "random:timm:test_resnet"
    assert enc["precision"] == "fp32 (asked fp16; no fp16 autocast on CPU; reference: fp32)"
    assert "asked fp16; no fp16 autocast on CPU" in capsys.readouterr().out
