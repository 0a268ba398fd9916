"""Image encoder registry: ``timm:<name>``, ``open_clip:<name>``, pathology foundation models, local checkpoints.

``create_image_encoder(spec, pretrained=..., ...)`` returns an :class:`ImageEncoder`: uint8 (or float in
[0, 1]) images (B, 3, H, W) in, (B, out_dim) features out. Normalisation (mean/std of the backbone's
pretrained config) and resizing to its input size happen inside, so datasets can yield uint8 crops.
``pretrained``: ``None``/``False`` = random init, a local file path = weights from that file, ``True`` =
the backbone's published weights (hub download or cache; tests never do this).
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import stalign.models.pathology_encoders  # noqa: F401  (registers the named pathology models)
import stalign.models.pathology_zoo  # noqa: F401  (registers the rest of HEST-Bench's encoders)
from stalign.models.backbones import (
    IMAGE_ENCODERS,
    PREFIX_BUILDERS,
    Backbone,
    CheckpointMismatchError,
    UnknownImageEncoderError,
    is_local_checkpoint,
    load_state_dict_file,
)
from stofm.util.errors import InputError
from stofm.util.safe_files import require_path

__all__ = ["CheckpointMismatchError", "ImageEncoder", "UnknownImageEncoderError", "create_image_encoder",
           "known_image_encoders", "load_state_dict_file", "run_precision"]


#: TRIDENT-style names (as HEST and TRIDENT spell them) -> the names here; ``resnet50-full`` is the whole ImageNet
#: ResNet-50 (2048-d), ``resnet50_trunc`` HEST's (truncated after layer3, 1024-d).
ALIASES = {"uni_v1": "uni", "uni_v2": "uni2", "uni2-h": "uni2", "conch_v1": "conch", "virchow_v1": "virchow",
           "virchow_v2": "virchow2", "hoptimus0": "h-optimus-0", "h_optimus_0": "h-optimus-0", "phikon_v1": "phikon",
           "hoptimus1": "h-optimus-1", "h_optimus_1": "h-optimus-1", "phikon_v2": "phikon-v2",
           "h0_mini": "h0-mini-cls", "resnet50-full": "timm:resnet50.tv_in1k", "resnet50": "timm:resnet50.tv_in1k"}
#: Names kept for old specs, with the warning they give.
DEPRECATED = {"resnet50": "'resnet50' is ambiguous and deprecated: here it is the whole ImageNet ResNet-50 "
                          "(2048-d, now 'resnet50-full'), while HEST-Bench's 'resnet50' is 'resnet50_trunc' (truncated "
                          "after layer3, 1024-d); name one of the two"}


def known_image_encoders() -> list[str]:
    """Registered names and spec prefixes (for error messages and ``--help``)."""
    return (sorted(IMAGE_ENCODERS) + sorted(ALIASES) + [f"{p}:<name>" for p in sorted(PREFIX_BUILDERS)]
            + ["hf-hub:<org>/<name>", "<name>:<local weights file>", "<local checkpoint path> + arch"])


# ------------------------------------------------------------------------------------------------ encoder
class ImageEncoder(nn.Module):
    """Backbone + preprocessing: uint8/float (B, 3, H, W) -> (B, out_dim) features."""

    def __init__(self, *, backbone: Backbone, spec: str) -> None:
        super().__init__()
        self.trunk, self.spec, self.out_dim = backbone.trunk, spec, backbone.out_dim
        self.input_size, self.interpolation = backbone.input_size, backbone.interpolation
        self.crop_pct, self.precision = backbone.crop_pct, backbone.precision
        self.mean, self.std = tuple(backbone.mean), tuple(backbone.std)
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] -> resized, normalised float."""
        import torch.nn.functional as F

        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.to(self._mean.dtype)
        size = int(self.input_size / self.crop_pct) if self.crop_pct < 1 else self.input_size
        if x.shape[-2:] != (size, size):
            mode = "bicubic" if self.interpolation == "bicubic" else "bilinear"
            x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
        if size != self.input_size:  # centre crop, as torchvision's CenterCrop
            top = int(round((size - self.input_size) / 2.0))
            x = x[..., top:top + self.input_size, top:top + self.input_size]
        return (x - self._mean) / self._std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, out_dim) features of (B, 3, H, W) crops; a (B, out_dim) float input is taken as this trunk's
        features already computed (a frozen encoder's, read from the feature store: ``frozen_image_features``)."""
        if x.ndim == 2 and x.is_floating_point():
            if x.shape[1] != self.out_dim:
                raise ValueError(f"stored features have {x.shape[1]} columns, the encoder {self.spec} gives "
                                 f"{self.out_dim}")
            return x
        feats = self.trunk(self.preprocess(x))
        if isinstance(feats, (tuple, list)):  # open_clip towers with output_tokens return (pooled, tokens)
            feats = feats[0]
        return feats

    def train(self, mode: bool = True) -> ImageEncoder:
        """As ``nn.Module.train``, but BatchNorm layers whose parameters are frozen keep their running statistics."""
        super().train(mode)
        if mode:
            for m in self.trunk.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in m.parameters(recurse=False)):
                    m.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """Recompute activations in backward (timm / open_clip trunks); returns whether the trunk supports it."""
        for m in (self.trunk, getattr(self.trunk, "visual", None), getattr(self.trunk, "vit", None),
                  getattr(self.trunk, "trunk", None)):
            if m is not None and hasattr(m, "set_grad_checkpointing"):
                m.set_grad_checkpointing(enable)
                return True
        return False

    def train_transform(self) -> Callable:
        """Augmentation for uint8 (…, 3, P, P) H&E crops: flips, 90° rotations, mild colour jitter, input-size resize."""
        from stalign.models.transforms import he_train_transform

        return he_train_transform(self.input_size, self.interpolation)

    def eval_transform(self) -> Callable:
        """Resize uint8 crops to the backbone's input size (normalisation stays inside the model)."""
        from stalign.models.transforms import he_eval_transform

        return he_eval_transform(self.input_size, self.interpolation)


def create_image_encoder(spec: str, *, pretrained: bool | str | os.PathLike | None = None, arch: str | None = None,
                         freeze: bool = False, unfreeze_last: int = 0, lora_rank: int = 0, lora_alpha: float = 16.0,
                         **kwargs: Any) -> ImageEncoder:
    """Build an image encoder from a spec (see module doc); ``kwargs`` go to the backbone constructor.

    ``arch`` names the architecture (a spec, e.g. ``timm:vit_base_patch16_224``) for a bare local checkpoint.
    ``freeze`` / ``unfreeze_last`` (train only the last n blocks) / ``lora_rank`` (adapters) select what trains.
    """
    from stalign.models.adapters import apply_trainability

    if str(spec) in DEPRECATED:
        warnings.warn(DEPRECATED[str(spec)], FutureWarning, stacklevel=2)
    spec = ALIASES.get(str(spec), str(spec))
    if spec.startswith("hf-hub:"):  # timm / open_clip semantics: a hub repo's own weights
        spec, pretrained = "timm:" + spec, True if pretrained is None else pretrained
    head, _, tail = spec.partition(":")
    if tail and ALIASES.get(head, head) in IMAGE_ENCODERS and is_local_checkpoint(tail):
        spec, arch = tail, ALIASES.get(head, head)  # name:PATH = the named architecture with local weights
    if spec in IMAGE_ENCODERS:
        backbone = IMAGE_ENCODERS[spec](pretrained=pretrained, **kwargs)
    elif ":" in spec and spec.split(":", 1)[0] in PREFIX_BUILDERS:
        prefix, name = spec.split(":", 1)
        backbone = PREFIX_BUILDERS[prefix](name, pretrained=pretrained, **kwargs)
    elif is_local_checkpoint(spec):
        if arch is None:
            raise InputError(f"{spec}: a local checkpoint needs its architecture: --arch NAME / arch= NAME, or "
                             f"the spec NAME:{spec} (e.g. uni:{spec} or timm:vit_base_patch16_224)")
        require_path(spec, "checkpoint file", missing="not found", folder_ok=True)
        return create_image_encoder(arch, pretrained=spec, freeze=freeze, unfreeze_last=unfreeze_last,
                                    lora_rank=lora_rank, lora_alpha=lora_alpha, **kwargs)
    else:
        raise UnknownImageEncoderError(f"unknown image encoder {spec!r}; known: {', '.join(known_image_encoders())}")
    encoder = ImageEncoder(backbone=backbone, spec=spec)
    apply_trainability(encoder.trunk, freeze=freeze, unfreeze_last=unfreeze_last, lora_rank=lora_rank,
                       lora_alpha=lora_alpha)
    return encoder


def run_precision(published: str, requested: str = "auto", device: Any = None) -> tuple[str, str]:
    """The precision to run an encoder under and its label for a results row.

    ``requested``: ``auto`` = the encoder's ``published`` precision (the autocast HEST-Bench runs it under, in its
    registry entry), or ``fp32`` / ``fp16`` / ``bf16``. fp16 autocast is not run on the CPU (slow or missing
    kernels there): it runs fp32 and the label says so.
    """
    from stalign.models.perf import PRECISIONS, resolve_device

    if requested not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    want = published if requested == "auto" else requested
    run = "fp32" if want == "fp16" and resolve_device(device).type == "cpu" else want
    notes = [f"asked {requested}"] if requested not in ("auto", published) else []
    if run != want:
        notes.append("no fp16 autocast on CPU")
    if notes or run != published:
        notes.append(f"reference: {_precision_name(published)}")
    return run, _precision_name(run) + (f" ({'; '.join(notes)})" if notes else "")


def _precision_name(precision: str) -> str:
    return precision if precision == "fp32" else f"{precision} autocast"
