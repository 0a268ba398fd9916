"""Backbone registry and weights: the builders behind image encoder specs (``timm:<name>``, named pathology
models registered in ``pathology_encoders``), state-dict files (safetensors / torch) loaded strictly into them.

A builder returns a :class:`Backbone` (trunk + its pretrained preprocessing config); ``image_encoders`` wraps it
into an ``ImageEncoder``.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stofm.util.errors import InputError, SetupError
from stofm.util.safe_files import require_path

IMAGE_ENCODERS: dict[str, Callable[..., Backbone]] = {}
PREFIX_BUILDERS: dict[str, Callable[..., Backbone]] = {}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UnknownImageEncoderError(InputError):
    """An image encoder spec that no registry entry, prefix or local file matches."""


class CheckpointMismatchError(InputError):
    """A state dict that does not fit the architecture it is loaded into."""


@dataclass
class Backbone:
    """What a builder returns: the trunk (normalised float images -> (B, out_dim)) and its pretrained config."""

    trunk: nn.Module
    out_dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224
    interpolation: str = "bicubic"
    crop_pct: float = 1.0  # < 1: resize to input_size / crop_pct, then centre-crop input_size (GigaPath: 224/256)
    precision: str = "fp32"  # the publisher's / HEST's inference precision: "fp32", "fp16" or "bf16" autocast


def register_image_encoder(name: str, *, precision: str = "fp32") -> Callable:
    """Decorator: register a builder ``fn(*, pretrained, **kwargs) -> Backbone`` under a published name;
    ``precision`` (the autocast HEST-Bench / TRIDENT run it under) is stamped on every backbone it builds."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        @functools.wraps(fn)
        def build(**kwargs: Any) -> Backbone:
            backbone = fn(**kwargs)
            backbone.precision = precision
            return backbone

        build.precision = precision  # type: ignore[attr-defined]
        IMAGE_ENCODERS[name] = build
        return fn

    return deco


def register_prefix(prefix: str) -> Callable:
    """Decorator: register a builder ``fn(name, *, pretrained, **kwargs) -> Backbone`` for specs ``<prefix>:<name>``."""

    def deco(fn: Callable[..., Backbone]) -> Callable[..., Backbone]:
        PREFIX_BUILDERS[prefix] = fn
        return fn

    return deco


# ----------------------------------------------------------------------------------------------- state dicts
WEIGHT_FILE_NAMES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin",
                     "open_clip_model.safetensors")


def resolve_weights_file(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a folder (e.g. a Hugging Face snapshot) its weights file."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: folder holds none of the weight files {', '.join(WEIGHT_FILE_NAMES)}")
    return path


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.bin`` file or a folder holding one (torch files are read
    with ``weights_only=True``)."""
    path = require_path(resolve_weights_file(path), "checkpoint file", missing="not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with code objects, truncated file, ...
        raise CheckpointMismatchError(f"{path}: not a loadable weights-only state dict ({err})") from err
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointMismatchError(f"{path}: expected a dict of tensors (a state dict)")
    return dict(obj)


def strip_prefixes(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "model.", "trunk.",
                                                                           "backbone.", "encoder.")) -> dict:
    """Drop wrapper prefixes that every key shares (DDP ``module.``, Lightning ``model.``, ...)."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if sd and all(k.startswith(p) for k in sd):
                sd, changed = {k[len(p):]: v for k, v in sd.items()}, True
    return sd


def load_into(module: nn.Module, sd: dict[str, torch.Tensor], *, source: str,
              ignore: tuple[str, ...] = ("head.", "fc.", "classifier.", "head_dist.")) -> None:
    """Load ``sd`` into ``module`` strictly, except classifier heads absent from a feature trunk."""
    sd = strip_prefixes(sd)
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own and not k.startswith(ignore)]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointMismatchError(
            f"{source}: state dict does not fit {type(module).__name__}: {len(missing)} missing "
            f"{missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
    module.load_state_dict({k: sd[k] for k in own}, strict=True)


def is_local_checkpoint(spec: Any) -> bool:
    """True for a path to an existing weights file (or a name that looks like one)."""
    return isinstance(spec, (str, os.PathLike)) and (Path(spec).exists() or str(spec).endswith(CHECKPOINT_SUFFIXES))


@contextlib.contextmanager
def hub_errors(name: str, *, upload: bool = False):
    """Turn a failed hub download (gated repo, no login, offline, unknown repo) or, with ``upload``, a failed upload
    (offline, hub unreachable, no login or no write access) into one line that says what to do."""
    try:
        yield
    except Exception as err:  # huggingface_hub and timm raise many kinds; only hub failures are rewritten
        kind = type(err).__name__
        text = " ".join(str(err).split())
        network = type(err).__module__.startswith(("httpx", "httpcore", "requests", "urllib3")) or \
            kind in ("ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout")
        hubby = network or kind in ("GatedRepoError", "RepositoryNotFoundError", "LocalEntryNotFoundError",
                                    "EntryNotFoundError", "HfHubHTTPError", "OfflineModeIsEnabled") or \
            "huggingface" in text.lower() or "hf_hub" in text.lower()
        if not hubby:
            raise
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

        repo = name.removeprefix("hf-hub:").split("@")[0]
        if upload:
            why = ("HF_HUB_OFFLINE is set: unset it to upload" if HF_HUB_OFFLINE or kind == "OfflineModeIsEnabled"
                   else f"this machine is offline or cannot reach the hub ({kind}: {text[:100]}); check the network"
                   if network else f"{kind}: {text[:160]}; log in with write access to {repo} (`hf auth login` or "
                   "HF_TOKEN)")
            raise SetupError(f"{name}: could not upload to the Hugging Face hub: {why}") from None
        raise SetupError(
            f"{name}: could not get the weights from the Hugging Face hub ({kind}). If the model is gated, accept "
            f"its licence at https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN); offline, "
            f"set HF_HUB_OFFLINE=1 with the weights already in the cache ({HF_HUB_CACHE}), or pass a local file "
            f"(NAME:/path/to/weights)") from None


def hub_file(repo: str, filename: str, **kwargs: Any) -> str:
    """One file of a Hugging Face hub repo, downloaded once, then from the cache (a failure: :func:`hub_errors`)."""
    from huggingface_hub import hf_hub_download

    with hub_errors(f"hf-hub:{repo}"):
        return hf_hub_download(repo, filename, **kwargs)


# ------------------------------------------------------------------------------------------------- timm
@register_prefix("timm")
def timm_backbone(name: str, *, pretrained: bool | str | os.PathLike | None = None, hub_name: str | None = None,
                  input_size: int | None = None, **kwargs: Any) -> Backbone:
    """A timm model as a pooled-feature trunk (``num_classes=0``); local weights loaded strictly."""
    import timm

    kwargs.setdefault("num_classes", 0)
    if pretrained is True:
        with hub_errors(hub_name or name):
            model = timm.create_model(hub_name or name, pretrained=True, **kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained:
            load_into(model, load_state_dict_file(pretrained), source=str(pretrained))
    return backbone_from_timm(model, input_size=input_size)


def backbone_from_timm(model: nn.Module, *, input_size: int | None = None, trunk: nn.Module | None = None,
                       out_dim: int | None = None) -> Backbone:
    """Read mean/std/input size/interpolation from a timm model's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size
    if size is None:
        patch_embed = getattr(model, "patch_embed", None)
        img_size = getattr(patch_embed, "img_size", None) if patch_embed is not None else None
        size = int(img_size[0]) if img_size is not None else int(cfg.get("input_size", (3, 224, 224))[-1])
    return Backbone(trunk=trunk if trunk is not None else model, out_dim=int(out_dim or model.num_features),
                    mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                    input_size=size, interpolation=str(cfg.get("interpolation", "bicubic")))
