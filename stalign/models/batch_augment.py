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

Speed on the CPU (where a 224-px crop's colour ops cost more than its read): large crops go a few at a time,
grouped by their colour-op order (each op runs once per group, with no gathering of crops per op; one crop's
factor is a number), every op writes in place or into scratch planes made once per batch (fresh memory costs
a page fault per 4 KiB; the output batch is numpy memory, which gets huge pages), flips and rot90 are numpy
views that the one uint8 -> float copy reads, and the hue shift uses arithmetic ops only (masks and ``where``
run several times slower than arithmetic on the CPU). The maths is the torchvision ops' (tested).

HED stain jitter (Tellez et al. 2018): RGB -> optical density -> haematoxylin/eosin/DAB with the Ruifrok &
Johnston matrix (``skimage.color.rgb2hed``), each stain ``s * alpha + beta`` with alpha ~ U(1 - sigma, 1 + sigma)
and beta ~ U(-sigma, sigma) in optical-density units, back to RGB (negative stain amounts kept, so no jitter is
the identity). Off unless ``stain > 0``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from stofm.util.errors import InputError

JITTER, HUE = 0.1, 0.02  # brightness/contrast/saturation and hue ranges of the training transform
#: Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB), as ``skimage.color.rgb_from_hed``
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
LUMA = (0.2989, 0.587, 0.114)  # torchvision's grey weights
_EPS = 1e-6  # skimage's floor on RGB before the log
# parameter row: hflip, vflip, rot90 k, colour-op order (4), brightness, contrast, saturation, hue, alpha (3), beta (3)
HFLIP, VFLIP, ROT, ORDER, FACTORS, ALPHA, BETA, N_PARAMS = 0, 1, 2, slice(3, 7), slice(7, 11), slice(11, 14), \
    slice(14, 17), 17
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)
WORK_PLANES = 6  # scratch planes per crop that the colour ops use (adjust_hue's six)
CPU_CHUNK_PIXELS = 4 * 224 * 224  # working pixels per pass on the CPU (four 224-px crops)
SAME_ORDER_MAX = 8  # passes of at most this many crops take crops of one colour-op order


def grey(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 1, H, W) luma of float RGB (n, 3, H, W), torchvision's weights (into ``out`` when given)."""
    w_r, w_g, w_b = LUMA
    out = torch.mul(x[:, 0:1], w_r, out=out) if out is not None else torch.mul(x[:, 0:1], w_r)
    return out.add_(x[:, 1:2], alpha=w_g).add_(x[:, 2:3], alpha=w_b)


def workspace(x: torch.Tensor) -> torch.Tensor:
    """Scratch planes for the colour ops on crops shaped like ``x`` (or fewer of them): (WORK_PLANES, n, H, W)."""
    return torch.empty((WORK_PLANES, len(x), *x.shape[-2:]), dtype=x.dtype, device=x.device)


def _planes(x: torch.Tensor, work: torch.Tensor | None) -> torch.Tensor:
    return (workspace(x) if work is None else work)[:, : len(x)]


def _values(f: torch.Tensor | float) -> list[float]:
    return [f] if isinstance(f, float) else f.reshape(-1).tolist()


def _factor(f: torch.Tensor | float, x: torch.Tensor) -> float | torch.Tensor:
    """One factor per image: a number when they are all equal (one crop), else an (n, 1, 1, 1) tensor on x's
    device. ``f``: a number (all images) or (n,) values, best on the CPU (else reading them waits for the
    device)."""
    vals = _values(f)
    return vals[0] if min(vals) == max(vals) else torch.tensor(vals, dtype=x.dtype, device=x.device).view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor | float, work: torch.Tensor | None = None) -> torch.Tensor:
    """``x * f`` clamped to [0, 1], one factor per image (f: (n,) or a number). The colour ops write into ``x`` (float) and
    return it; ``work``: scratch planes from ``workspace`` (made when not given)."""
    return x.mul_(_factor(f, x)).clamp_(0.0, 1.0)


def _blend_(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor | float) -> torch.Tensor:
    """``f * x + (1 - f) * other`` clamped to [0, 1] (torchvision's ``_blend``), one factor per image; writes into
    ``x`` and ``other``."""
    f = _factor(f, x)
    return x.mul_(f).add_(other.mul_(1.0 - f)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor | float, work: torch.Tensor | None = None) -> torch.Tensor:
    """Blend with each image's mean grey (torchvision ``adjust_contrast``; the mean grey as the weighted channel
    means: the same value without a grey image)."""
    mean_grey = x.mean(dim=(2, 3)) @ x.new_tensor(LUMA)
    return _blend_(x, mean_grey.view(-1, 1, 1, 1), f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor | float, work: torch.Tensor | None = None) -> torch.Tensor:
    """Blend with the grey image (torchvision ``adjust_saturation``)."""
    return _blend_(x, grey(x, _planes(x, work)[0].unsqueeze(1)), f)


def adjust_hue(x: torch.Tensor, f: torch.Tensor | float, work: torch.Tensor | None = None) -> torch.Tensor:
    """Shift the HSV hue by ``f`` turns (torchvision ``adjust_hue``, |f| <= 0.5) with arithmetic ops only.

    HSV keeps the value (max) and d = max - min; with the hue in sextants h, channel c is max - d * T(h + n_c),
    n = 5, 3, 1 for r, g, b, T(k) = clamp(2 - w, 0, 1) where w is k's distance to the nearest 2 + 6j (the HSV
    -> RGB formula). In units of d: d * h is g - b, b - r + 2d or r - g + 4d as r, g or b is the max (ties give
    the same colour), picked by the signs of max - r and max - g, so d * k lies in [(s - 1) d, (s + 5) d] for
    the shift s = n_c + 6f; over that range d * w = ||d * k - C d| - 3d| for the C = 5 + 6j in [s - 1, s + 5]
    (j = floor(s / 6)), and channel c = clamp(d * w + min - d, min, max)."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hi, lo, d, dh, br, tmp = _planes(x, work)
    torch.maximum(torch.maximum(r, g, out=hi), b, out=hi)
    torch.minimum(torch.minimum(r, g, out=lo), b, out=lo)
    torch.sub(hi, lo, out=d)
    torch.sub(g, b, out=dh)
    torch.sub(b, r, out=br)
    step = torch.sub(br, dh, out=tmp).add_(d, alpha=2.0)  # (b - r + 2d) - (g - b)
    not_r, not_g = torch.sub(hi, r, out=r).sign_(), torch.sub(hi, g, out=g).sign_()  # 0 where r (g) is the max
    step.addcmul_(not_g, torch.add(dh, br, alpha=2.0, out=b).sub_(d, alpha=2.0).neg_())  # + (r-g+4d) - (b-r+2d)
    dh.addcmul_(not_r, step)  # d * h, in [-d, 5d]; x's planes are free from here
    low = torch.sub(lo, d, out=br)  # min - d
    shifts = [[6.0 * v + n for n in (5.0, 3.0, 1.0)] for v in _values(f)]  # s per crop and channel
    coef = [[s - 5.0 - 6.0 * math.floor(s / 6.0) for s in row] for row in shifts]  # s - C
    coef = torch.tensor(coef, dtype=x.dtype).view(-1, 3, 1, 1).to(x.device)  # all three channels in one op each
    torch.addcmul(dh.unsqueeze(1), d.unsqueeze(1), coef, out=x)
    x.abs_().sub_(d.unsqueeze(1), alpha=3.0).abs_().add_(low.unsqueeze(1))
    return torch.clamp(x, min=lo.unsqueeze(1), max=hi.unsqueeze(1), out=x)


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
    stay in cache; the whole batch on a GPU); see ``_chunks``."""

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
        p = params.detach().to("cpu", torch.float64).numpy()
        plane = (self.size, self.size) if x.shape[-1] > self.size else tuple(x.shape[-2:])  # as _augment works
        chunks = self._chunks(p, plane[-1], x.device)
        most = max((len(rows) for rows in chunks), default=1)
        out = batch_buffer((len(x), 3, self.size, self.size), x.device)
        work = torch.empty((WORK_PLANES, most, *plane), dtype=torch.float32, device=x.device)
        spread = None  # a chunk's crops whose rows are not consecutive, before they go to their rows
        stain = bool((p[:, ALPHA] != 1).any() or (p[:, BETA] != 0).any())
        for rows in chunks:
            start, stop = int(rows[0]), int(rows[-1]) + 1
            if stop - start == len(rows):  # consecutive rows: straight into the output
                self._augment(x, rows, p[start:stop], out[start:stop], work, stain)
                continue
            spread = batch_buffer((most, *out.shape[1:]), x.device) if spread is None else spread
            self._augment(x, rows, p[rows], spread[: len(rows)], work, stain)
            out.index_copy_(0, torch.from_numpy(rows).to(x.device), spread[: len(rows)])
        return out

    def _chunks(self, p: np.ndarray, side: int, device: torch.device) -> list[np.ndarray]:
        """The batch rows of each pass through the ops: ``chunk`` crops (None: the whole batch on a GPU,
        ``CPU_CHUNK_PIXELS`` of working pixels on the CPU). Chunks of at most ``SAME_ORDER_MAX`` crops (large
        crops) hold crops with the same colour ops in the same order (consecutive after a stable sort by it):
        each op then runs once over the chunk, with no gathering of crops per op."""
        n = len(p)
        size = self.chunk or (n if device.type != "cpu" else max(1, CPU_CHUNK_PIXELS // side ** 2))
        if size > SAME_ORDER_MAX:
            return [np.arange(s, min(s + size, n)) for s in range(0, n, size)]
        active = p[:, FACTORS] != np.asarray(IDENTITY_FACTORS)
        keys = [tuple(op for op in row if active[i, op]) for i, row in enumerate(p[:, ORDER].astype(int).tolist())]
        chunks: list[list[int]] = []
        for i in sorted(range(n), key=lambda i: keys[i]):  # stable: rows ascend within a key
            if not chunks or len(chunks[-1]) == size or keys[chunks[-1][0]] != keys[i]:
                chunks.append([])
            chunks[-1].append(i)
        return [np.asarray(rows) for rows in chunks]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """To size x size, antialiased; uint8 stays uint8 on the CPU (torch's uint8 kernel: rounded as
        torchvision's uint8 resize, ~4x faster than float), else float in [0, 1]."""
        if x.shape[-2:] == (self.size, self.size):
            return x
        if x.dtype == torch.uint8 and x.device.type != "cpu":  # GPU antialiased kernels are float only
            x = to_unit(x)
        x = F.interpolate(x, size=(self.size, self.size), mode=self.mode, align_corners=False, antialias=True)
        return x.clamp_(0.0, 1.0) if x.is_floating_point() and self.mode == "bicubic" else x

    def _augment(self, x: torch.Tensor, rows: np.ndarray, p: np.ndarray, out: torch.Tensor, work: torch.Tensor,
                 stain: bool) -> None:
        """Augment the crops ``rows`` of the batch ``x`` (``p``: their parameter rows) into ``out``."""
        if x.shape[-1] > self.size:  # fewer pixels for everything after (flips and rot90 commute with the resize)
            x = self._resize(take_rows(x, rows))
            rows = np.arange(len(rows))
        y = out if x.shape[-2:] == out.shape[-2:] else torch.empty((len(rows), *x.shape[1:]), dtype=out.dtype,
                                                                      device=x.device)
        unit_geometric(x, p, y, rows)
        if stain:
            y = hed_jitter(y, torch.from_numpy(p[:, ALPHA]).to(y), torch.from_numpy(p[:, BETA]).to(y))
        colour_jitter(y, p, work)
        if y is not out:
            out.copy_(self._resize(y))


def batch_buffer(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An empty float32 tensor for a whole output batch. On the CPU numpy's memory: numpy asks Linux for huge
    pages for large arrays (madvise), so a fresh 224-px batch of 64 (38.5 MB) takes ~20 page faults instead of
    ~9,400 of 4 KiB (a few times faster to fill)."""
    if torch.device(device).type == "cpu":
        return torch.from_numpy(np.empty(shape, dtype=np.float32))
    return torch.empty(shape, dtype=torch.float32, device=device)


def take_rows(x: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """``x[rows]``: a view when the rows are consecutive (no copy), else an indexed copy."""
    if len(rows) and (np.diff(rows) == 1).all():
        return x[int(rows[0]):int(rows[-1]) + 1]
    return x[torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(x.device)]


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1]; float stays (as float32)."""
    if x.dtype == torch.uint8:
        return batch_buffer(tuple(x.shape), x.device).copy_(x).div_(255.0)
    return x.float()


def _rows(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.flatnonzero(mask)).to(device, non_blocking=True)


def _codes(p: np.ndarray) -> np.ndarray:
    """Each crop's flips and rotation as one number: 8 * hflip + 4 * vflip + k."""
    return (p[:, HFLIP] * 8 + p[:, VFLIP] * 4 + p[:, ROT]).astype(np.int64)


def unit_geometric(x: torch.Tensor, p: np.ndarray, out: torch.Tensor, rows: np.ndarray | None = None) -> torch.Tensor:
    """The crops ``rows`` of ``x`` (default all) flipped left-right (p[:, HFLIP]), up-down (p[:, VFLIP]), then
    rotated by k * 90 deg (p[:, ROT]), as ``RandomHorizontalFlip``, ``RandomVerticalFlip``, ``RandomRot90`` in
    that order, written into the float ``out`` in [0, 1] (uint8 / 255). ``p``: their parameter rows (numpy).
    On the CPU each crop is one copy from a numpy view (flips and rotations are strides there; the copy also
    casts and lays the channels out in planes); elsewhere one torch op per group with the same flips and
    rotation."""
    rows = np.arange(len(x)) if rows is None else rows
    if x.device.type == "cpu":
        _geometric_numpy(x, rows, _codes(p), out)
    else:
        _geometric_torch(take_rows(x, rows), _codes(p), out)
    return out.div_(255.0) if x.dtype == torch.uint8 else out


def _geometric_numpy(x: torch.Tensor, rows: np.ndarray, codes: np.ndarray, out: torch.Tensor) -> None:
    src, dst = (x.detach() if x.dtype != torch.bfloat16 else x.detach().float()).numpy(), out.numpy()
    for i, (row, c) in enumerate(zip(rows.tolist(), codes.tolist())):
        view = src[row]
        if c & 8:
            view = view[:, :, ::-1]
        if c & 4:
            view = view[:, ::-1]
        np.copyto(dst[i], np.rot90(view, c & 3, axes=(1, 2)))


def _geometric_torch(x: torch.Tensor, codes: np.ndarray, out: torch.Tensor) -> None:
    groups = np.unique(codes).tolist()
    for c in groups:
        rows = None if len(groups) == 1 else _rows(codes == c, x.device)
        y = x if rows is None else x.index_select(0, rows)
        if c & 8:
            y = y.flip(-1)
        if c & 4:
            y = y.flip(-2)
        if c & 3:
            y = torch.rot90(y, c & 3, dims=(-2, -1))
        if rows is None:
            out.copy_(y)
        else:
            out.index_copy_(0, rows, y.to(out.dtype))


def colour_jitter(x: torch.Tensor, p: np.ndarray, work: torch.Tensor | None = None) -> torch.Tensor:
    """``ColorJitter`` with each crop's factors (p[:, FACTORS]) in its own order (p[:, ORDER]), in place on the
    float crops ``x``: at each of the four positions, every op runs once on the crops that have it there
    (identity factors are skipped). ``p``: parameter rows (numpy); ``work``: scratch planes (``workspace``)
    for at least ``len(x)`` crops."""
    order, factors = p[:, ORDER].astype(np.int64), p[:, FACTORS]
    active = factors != np.asarray(IDENTITY_FACTORS)
    work = workspace(x) if work is None else work
    if len(x) == 1:  # one crop: its ops in its order
        for op in order[0].tolist():
            if active[0, op]:
                COLOUR_OPS[op](x, float(factors[0, op]), work)
        return x
    for t in range(4):
        for op, fn in enumerate(COLOUR_OPS):
            mask = (order[:, t] == op) & active[:, op]
            if not mask.any():
                continue
            f = torch.from_numpy(factors[mask, op])
            if mask.all():
                fn(x, f, work)
            else:
                rows = _rows(mask, x.device)
                x.index_copy_(0, rows, fn(x.index_select(0, rows), f, work))
    return x
