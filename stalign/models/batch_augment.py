"""H&E crop augmentation as batched tensor ops, run where the batch is (the training device, or the CPU).

``BatchAugment(size, interpolation, train=True)`` does what ``he_train_transform`` (``stalign.models.transforms``)
does to one crop, to a whole uint8 (B, 3, P, P) batch at once, with one parameter row per crop: horizontal and
vertical flip, rot90, colour jitter (brightness, contrast, saturation, hue, in the per-crop random order of
torchvision's ``ColorJitter``), an optional HED stain jitter, and the resize to the encoder's input size. Its
output is float in [0, 1] (the image encoders take uint8 or [0, 1] float). ``train=False`` only resizes.

``draw(generator)`` draws one crop's row from a ``torch.Generator`` in the order torchvision's v2 transforms draw
from the global RNG (flip, flip, rot90, ``randperm(4)``, brightness, contrast, saturation, hue), so a crop seeded
as before gets the per-sample path's parameters; the stain factors come after them.

Differences from the per-sample path, by design: colour ops run in float (no uint8 rounding between them), and
when the crop is larger than the input size the resize runs first (jitter on fewer pixels; flips and rot90
commute with it, colour ops are pointwise, contrast uses the resized crop's mean grey).

HED stain jitter (Tellez et al. 2018): RGB -> optical density -> haematoxylin/eosin/DAB with the Ruifrok &
Johnston matrix (``skimage.color.rgb2hed``), each stain ``s * alpha + beta`` with alpha ~ U(1 - sigma, 1 + sigma)
and beta ~ U(-sigma, sigma) in optical-density units, back to RGB (negative stain amounts kept, so no jitter is
the identity). Off unless ``stain > 0``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stofm.util.errors import InputError

JITTER, HUE = 0.1, 0.02  # brightness/contrast/saturation and hue ranges of the training transform
#: Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as ``skimage.color.rgb_from_hed``
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_EPS = 1e-6  # skimage's floor on RGB before the log
# parameter row: hflip, vflip, rot90 k, colour-op order (4), brightness, contrast, saturation, hue, alpha (3), beta (3)
HFLIP, VFLIP, ROT, ORDER, FACTORS, ALPHA, BETA, N_PARAMS = 0, 1, 2, slice(3, 7), slice(7, 11), slice(11, 14), \
    slice(14, 17), 17
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)
CPU_CHUNK_PIXELS = 2 * 224 * 224  # crop pixels per pass on the CPU (two 224-px crops): the working set stays in cache


def grey(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luma of float RGB (n, 3, H, W), torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``x * f`` clamped to [0, 1], one factor per image (f: (n,))."""
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``f * x + (1 - f) * other`` clamped to [0, 1] (torchvision's ``_blend``), one factor per image."""
    return torch.lerp(other.expand_as(x), x, f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with each image's mean grey (torchvision ``adjust_contrast``)."""
    return _blend(x, grey(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Blend with the grey image (torchvision ``adjust_saturation``)."""
    return _blend(x, grey(x), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Shift the HSV hue by ``f`` turns (torchvision ``adjust_hue``, |f| <= 0.5): value (max) and max - min stay,
    and each channel is max - (max - min) * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h') mod 6, n = 5, 3, 1 for
    r, g, b (the HSV -> RGB formula), with branch-free wraps (h' lies in [-4, 8) before its wrap)."""
    r, g, b = x.unbind(1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    delta = maxc - torch.minimum(torch.minimum(r, g), b)
    h = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(delta, alpha=2.0),
                                                  (r - g).add_(delta, alpha=4.0)))
    h.mul_(delta.clamp(min=1e-12).reciprocal_()).add_(6.0 * f.view(-1, 1, 1))  # sextants; 0 where grey
    h.add_((h < 0).to(h.dtype), alpha=6.0).sub_((h >= 6).to(h.dtype), alpha=6.0)
    out = torch.empty_like(x)
    for c, n in enumerate((5.0, 3.0, 1.0)):
        k = h + n
        k.sub_((k >= 6).to(k.dtype), alpha=6.0)
        torch.sub(maxc, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(delta), out=out[:, c])
    return out


COLOUR_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per image: stains = OD @ HED_FROM_RGB (OD = -log RGB), stains * alpha + beta (optical density units), back
    to RGB with RGB_FROM_HED, clamped to [0, 1]. alpha, beta: (n, 3). Unlike ``skimage.color.rgb2hed`` negative
    stain amounts are kept, so alpha = 1, beta = 0 gives the crop back (skimage clips them to 0, which moves
    colours outside the three stains' gamut even without jitter)."""
    to_hed, to_rgb = HED_FROM_RGB.to(x), RGB_FROM_HED.to(x)
    od = -torch.log(x.clamp(min=_EPS))
    stains = torch.einsum("nchw,cd->ndhw", od, to_hed)
    stains = stains * alpha.view(-1, 3, 1, 1) + beta.view(-1, 3, 1, 1)
    return torch.exp(-torch.einsum("ndhw,dc->nchw", stains, to_rgb)).clamp_(0.0, 1.0)


class BatchAugment:
    """Augment (train) or only resize (eval) uint8 (B, 3, P, P) crops to float (B, 3, size, size) in [0, 1].

    ``chunk``: crops per pass through the ops (None: ``CPU_CHUNK_PIXELS`` worth on the CPU, where a few at a time
    stay in cache; the whole batch on a GPU)."""

    def __init__(self, size: int, interpolation: str = "bicubic", *, train: bool = True, jitter: float = JITTER,
                 hue: float = HUE, stain: float = 0.0, chunk: int | None = None) -> None:
        if not (0 <= stain < 1 and jitter >= 0 and 0 <= hue <= 0.5):
            raise InputError(f"augmentation ranges: 0 <= stain < 1, jitter >= 0, 0 <= hue <= 0.5; got "
                             f"jitter={jitter}, hue={hue}, stain={stain}")
        self.size, self.mode, self.train = int(size), "bicubic" if interpolation == "bicubic" else "bilinear", train
        self.jitter, self.hue, self.stain, self.chunk = float(jitter), float(hue), float(stain), chunk

    def __repr__(self) -> str:
        return (f"BatchAugment(size={self.size}, {self.mode}, train={self.train}, jitter={self.jitter}, "
                f"hue={self.hue}, stain={self.stain})")

    def draw(self, g: torch.Generator) -> list[float]:
        """One crop's parameter row (``N_PARAMS`` values; empty when not training), drawn from ``g``."""
        if not self.train:
            return []

        u, k = torch.empty(1), torch.empty(1, dtype=torch.int64)  # reused: a draw costs one call, not a tensor

        def uniform(lo: float = 0.0, hi: float = 1.0) -> float:  # = torch.empty(1).uniform_(lo, hi) / torch.rand(1)
            return u.uniform_(lo, hi, generator=g).item()

        row = [float(uniform() < 0.5), float(uniform() < 0.5), float(k.random_(0, 4, generator=g).item()),
               *map(float, torch.randperm(4, generator=g).tolist())]
        j = self.jitter
        row += [uniform(max(0.0, 1 - j), 1 + j) if j > 0 else 1.0 for _ in range(3)]
        row += [uniform(-self.hue, self.hue) if self.hue > 0 else 0.0]
        if self.stain > 0:
            row += [uniform(1 - self.stain, 1 + self.stain) for _ in range(3)]
            row += [uniform(-self.stain, self.stain) for _ in range(3)]
        else:
            row += [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
        return row

    def __call__(self, x: torch.Tensor, params: torch.Tensor | None = None) -> torch.Tensor:
        """Augmented float crops from uint8 (or [0, 1] float) ones; ``params``: (B, N_PARAMS) rows from ``draw``
        (on the CPU; needed when training)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"crops must be (B, 3, H, W), got {tuple(x.shape)}")
        if not self.train:
            return to_unit(self._resize(x))
        if params is None or params.shape != (len(x), N_PARAMS):
            raise ValueError(f"need a ({len(x)}, {N_PARAMS}) parameter tensor, got "
                             f"{None if params is None else tuple(params.shape)}")
        params = params.detach().to("cpu", torch.float64)
        chunk = self.chunk or (len(x) if x.device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // x[0, 0].numel()))
        out = torch.empty((len(x), 3, self.size, self.size), dtype=torch.float32, device=x.device)
        for start in range(0, len(x), chunk):
            stop = min(start + chunk, len(x))
            out[start:stop] = self._augment(x[start:stop], params[start:stop])
        return out

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """To size x size, antialiased; uint8 stays uint8 on the CPU (torch's uint8 kernel: rounded as
        torchvision's uint8 resize, ~4x faster than float), else float in [0, 1]."""
        if x.shape[-2:] == (self.size, self.size):
            return x
        if x.dtype == torch.uint8 and x.device.type != "cpu":  # GPU antialiased kernels are float only
            x = to_unit(x)
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return x.clamp_(0.0, 1.0) if x.is_floating_point() and self.mode == "bicubic" else x

    def _augment(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        shrink = x.shape[-1] > self.size
        if shrink:  # fewer pixels for everything after (flips and rot90 commute with the resize)
            x = self._resize(x)
        x = to_unit(geometric(x, p))
        if bool((p[:, ALPHA] != 1).any() or (p[:, BETA] != 0).any()):
            x = hed_jitter(x, p[:, ALPHA].to(x), p[:, BETA].to(x))
        x = colour_jitter(x, p)
        return x if shrink else self._resize(x)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float stays (as float32)."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _rows(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(mask)).to(device, non_blocking=True)


def geometric(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Each crop flipped left-right (p[:, HFLIP]), up-down (p[:, VFLIP]), then rotated by k * 90 deg (p[:, ROT]),
    as ``RandomHorizontalFlip``, ``RandomVerticalFlip``, ``RandomRot90`` in that order; one op per group.
    ``p`` lives on the CPU (the grouping is numpy: no device sync)."""
    code = (p[:, HFLIP] * 8 + p[:, VFLIP] * 4 + p[:, ROT]).numpy().astype(np.int64)
    if (code == 0).all():
        return x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for c in np.unique(code).tolist():
        rows = _rows(code == c, x.device)
        y = x.index_select(0, rows)
        if c & 8:
            y = y.flip(-1)
        if c & 4:
            y = y.flip(-2)
        if c & 3:
            y = torch.rot90(y, c & 3, dims=(-2, -1))
        out.index_copy_(0, rows, y.contiguous())
    return out


def colour_jitter(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``ColorJitter`` with each crop's factors (p[:, FACTORS]) in its own order (p[:, ORDER]): at each of the
    four positions, every op runs once on the crops that have it there (identity factors are skipped)."""
    order, factors = p[:, ORDER].numpy().astype(np.int64), p[:, FACTORS].numpy()
    active = factors != np.asarray(IDENTITY_FACTORS)
    owned = False  # x is a tensor made here (written in place) rather than the caller's
    for t in range(4):
        for op, fn in enumerate(COLOUR_OPS):
            mask = (order[:, t] == op) & active[:, op]
            if not mask.any():
                continue
            f = torch.from_numpy(factors[mask, op]).to(x.device, x.dtype)
            if mask.all():
                x, owned = fn(x, f), True
                continue
            rows = _rows(mask, x.device)
            y = fn(x.index_select(0, rows), f)
            x, owned = (x.index_copy_(0, rows, y) if owned else x.index_copy(0, rows, y)), True
    return x
