"""Train / eval transforms for uint8 H&E crops (tensors (…, 3, P, P)); normalisation stays in the model.

H&E has no canonical orientation, so training uses flips and 90° rotations (lossless on a square crop)
plus mild colour jitter for stain variation; both transforms resize to the backbone's input size with
the interpolation of its pretrained config. No centre crop: crops are cut at a physical size (µm).

These are the per-sample transforms (one crop at a time, uint8 in and out). Training runs their batched twin,
``stalign.models.batch_augment.BatchAugment``, on the device: the same parameters per seed, the same ranges.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from stalign.models.batch_augment import HUE, JITTER


class RandomRot90(nn.Module):
    """Rotate by k·90° with k uniform in {0, 1, 2, 3}."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(0, 4, ()).item())
        return torch.rot90(x, k, dims=(-2, -1)) if k else x


def _interp(name: str):
    from torchvision.transforms import InterpolationMode

    return InterpolationMode.BICUBIC if name == "bicubic" else InterpolationMode.BILINEAR


def he_train_transform(size: int, interpolation: str = "bicubic", *, jitter: float = JITTER,
                       hue: float = HUE) -> Callable:
    """Flips, rot90, colour jitter (brightness/contrast/saturation ``jitter``, hue ``hue``), resize to ``size``."""
    from torchvision.transforms import v2

    return v2.Compose([
        v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(), RandomRot90(),
        v2.ColorJitter(brightness=jitter, contrast=jitter, saturation=jitter, hue=hue),
        v2.Resize((size, size), interpolation=_interp(interpolation), antialias=True),
    ])


def he_eval_transform(size: int, interpolation: str = "bicubic") -> Callable:
    """Resize to ``size`` (uint8 stays uint8)."""
    from torchvision.transforms import v2

    return v2.Resize((size, size), interpolation=_interp(interpolation), antialias=True)
