"""The rest of HEST-Bench's encoder zoo, built as HEST-Bench builds it (mahmoodlab/HEST
``src/hest/bench/cpath_model_zoo/inference_models.py``, TRIDENT's ``patch_encoder_models/load.py``) and loaded from
local files in each publisher's format.

- ``resnet50_trunc``: HEST's ``resnet50`` baseline: timm ``resnet50.tv_in1k`` (torchvision's ImageNet weights)
  truncated after ``layer3`` (``features_only``, ``out_indices=[3]``), global average pool, 1024-d.
- ``ctranspath``: Swin-T/4 window 7 with TransPath's ConvStem patch embedding, 768-d mean-pooled tokens; the
  TransPath checkpoint ``ctranspath.pth`` (``{"model": state dict}`` in timm 0.5.4's Swin layout).
The zoo's timm ViTs built with their publishers' arguments are entries of ``pathology_encoders.TIMM_MODELS``:

- ``gigapath``: Prov-GigaPath's tile encoder: timm ``vit_giant_patch14_dinov2`` with ``img_size=224``, ``in_chans=3``,
  16 px patches, 1536-d CLS; HEST's transform (resize 256 bicubic, centre-crop 224).
- ``h0-mini`` (model card: CLS ⊕ mean patch token, 1536-d) and ``h0-mini-cls`` (HEST's ``h0_mini``: CLS, 768-d):
  Bioptimus' distilled ViT-B/14 with 4 registers and SwiGLU, H-optimus mean/std.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stalign.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    backbone_from_timm,
    hub_errors,
    hub_file,
    load_into,
    load_state_dict_file,
    register_image_encoder,
)
from stalign.models.pathology_encoders import Pretrained


# ------------------------------------------------------------------------------------------ ResNet-50
class PooledFeatureMap(nn.Module):
    """The last feature map of a timm ``features_only`` trunk, global-average pooled: (B, C)."""

    def __init__(self, *, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)[-1].mean(dim=(-2, -1))


@register_image_encoder("resnet50_trunc")
def resnet50_trunc(*, pretrained: Pretrained = None, **overrides: Any) -> Backbone:
    """HEST-Bench's ResNet-50: torchvision's ImageNet ResNet-50 up to ``layer3``, average pooled, 1024-d. A local
    file is torchvision's / timm's whole ``resnet50`` state dict (its ``layer4`` and ``fc`` are not used)."""
    import timm

    kwargs = {"features_only": True, "out_indices": [3], **overrides}
    if pretrained is True:
        with hub_errors("hf-hub:timm/resnet50.tv_in1k"):
            features = timm.create_model("resnet50.tv_in1k", pretrained=True, **kwargs)
    else:
        features = timm.create_model("resnet50", pretrained=False, **kwargs)
        if pretrained:
            load_into(features, load_state_dict_file(pretrained), source=str(pretrained), ignore=("layer4.", "fc."))
    return Backbone(trunk=PooledFeatureMap(features=features), out_dim=int(features.feature_info.channels()[-1]),
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=224, interpolation="bilinear")


# ------------------------------------------------------------------------------------------ CTransPath
class ConvStem(nn.Module):
    """CTransPath's patch embedding (TransPath ``ctran.py``): two stride-2 3x3 conv + BN + ReLU, a 1x1 conv to
    ``embed_dim``, then the Swin patch LayerNorm; (B, H/4, W/4, C) out, as timm's Swin wants."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: Any = None, **_: Any) -> None:
        super().__init__()
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if patch_size != 4 or embed_dim % 8:
            raise ValueError(f"ConvStem needs patch_size 4 and embed_dim divisible by 8 (got {patch_size}, {embed_dim})")
        self.img_size, self.patch_size = size, (patch_size, patch_size)
        self.grid_size = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in, c_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True)]
            c_in, c_out = c_out, c_out * 2
        self.proj = nn.Sequential(*layers, nn.Conv2d(c_in, embed_dim, kernel_size=1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


@register_image_encoder("ctranspath")
def ctranspath(*, pretrained: Pretrained = None, **overrides: Any) -> Backbone:
    """CTransPath: Swin-T/4 (window 7) with ConvStem, 768-d. Weights: TransPath's ``ctranspath.pth`` (timm 0.5.4 Swin
    keys: downsampling at the end of a stage, ``relative_position_index`` / ``attn_mask`` buffers), converted by
    timm's own Swin checkpoint filter; ``pretrained=True`` = the copy in HEST-Bench's data set (gated)."""
    import timm
    from timm.models.swin_transformer import checkpoint_filter_fn

    if pretrained is True:
        pretrained = hub_file("MahmoodLab/hest-bench", "fm_v1/ctranspath/ctranspath.pth", repo_type="dataset")
    kwargs = {"img_size": 224, "embed_layer": ConvStem, "num_classes": 0, **overrides}
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **kwargs)
    if pretrained:
        sd = checkpoint_filter_fn(load_state_dict_file(pretrained), model)
        load_into(model, sd, source=str(pretrained), ignore=("head.",))
    bb = backbone_from_timm(model, input_size=int(kwargs["img_size"]))
    bb.mean, bb.std, bb.interpolation = IMAGENET_MEAN, IMAGENET_STD, "bilinear"
    return bb
