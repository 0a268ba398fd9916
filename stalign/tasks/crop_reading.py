"""Reading the (spot, niche) crop pairs of a slide for embedding: one slide read per pair when both crops come
from the same pyramid level, and batches read by reader threads (CPU) or reader processes (GPU).

Crops are those of ``Slide.read_crop`` (best pyramid level, white outside the image), resampled with the filter
the model's data used (``resample``: ``"lanczos"``, the default of ``stalign prep``, or ``"bilinear"``).

Why threads on the CPU: openslide's decoding and PIL's resampling release the GIL, so reader threads overlap
with the model in one process, without the start-up cost of spawned processes; the model gets the cores the
readers leave (``reading_plan``), because torch threads that share a core with a reader wait on each other.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stalign.data.slide import resample_filter


def _crop_box(slide: Any, center: np.ndarray, size: float, out_px: int) -> tuple[int, float, float, float, bool]:
    """(level, x, y, width) of a ``read_crop`` box in that level's pixels, and whether it is an exact read
    (no resampling: ``read_crop`` then copies pixels)."""
    level = slide.best_level(size / out_px)
    ds = slide.level_downsamples[level]
    lx, ly, ls = (center[0] - size / 2) / ds, (center[1] - size / 2) / ds, size / ds
    exact = abs(ls - out_px) < 1e-6 and abs(lx - round(lx)) < 1e-6 and abs(ly - round(ly)) < 1e-6
    return level, lx, ly, ls, exact


def read_crop_pair(slide: Any, center: Any, spot_px: float, niche_px: float, patch_px: int, *,
                   resample: str | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The spot and niche crops (``patch_px``², RGB uint8) of ``Slide.read_crop`` around ``center`` (level-0 px).

    When both crops come from the same pyramid level, one region covering both (with the filter's margin) is
    read and each crop is resampled from its own part of it, exactly as ``read_crop`` does (bit-identical
    output); otherwise (or for an exact, unresampled crop) each is read apart.
    """
    from PIL import Image

    center = np.asarray(center, dtype=np.float64).reshape(2)
    filt = resample_filter(resample)
    if not np.isfinite(center).all() or not (spot_px > 0 and niche_px > 0 and patch_px > 0):  # read_crop's errors
        return tuple(slide.read_crop(center, size, patch_px, resample=filt)[0] for size in (spot_px, niche_px))
    boxes = [_crop_box(slide, center, float(size), int(patch_px)) for size in (spot_px, niche_px)]
    if boxes[0][0] != boxes[1][0] or boxes[0][4] or boxes[1][4]:
        return tuple(slide.read_crop(center, size, patch_px, resample=filt)[0] for size in (spot_px, niche_px))
    spans = []
    for _, lx, ly, ls, _ in boxes:  # the region read_crop would read for this box (its filter margin included)
        margin = math.ceil(3 * max(ls / patch_px, 1.0)) + 1
        ix, iy = math.floor(lx) - margin, math.floor(ly) - margin
        spans.append((ix, iy, math.ceil(lx + ls) + margin, math.ceil(ly + ls) + margin))
    x0, y0 = min(s[0] for s in spans), min(s[1] for s in spans)
    x1, y1 = max(s[2] for s in spans), max(s[3] for s in spans)
    region = slide._read_level(boxes[0][0], x0, y0, x1 - x0, y1 - y0)
    crops = []
    for (_, lx, ly, ls, _), (ix, iy, jx, jy) in zip(boxes, spans, strict=True):  # read_crop's own region and box
        sub = Image.fromarray(np.ascontiguousarray(region[iy - y0:jy - y0, ix - x0:jx - x0]))
        crops.append(np.asarray(sub.resize((patch_px, patch_px), resample=filt,
                                           box=(lx - ix, ly - iy, lx - ix + ls, ly - iy + ls)), dtype=np.uint8))
    return crops[0], crops[1]


class SlideCrops:
    """Map-style dataset of (spot, niche) uint8 crops (3, P, P) around level-0 centres of one slide.

    Picklable: each DataLoader worker re-opens the slide by path (``Slide`` pickles as path + pixel size).
    ``resample``: the filter the model's data used (``"lanczos"`` (default) or ``"bilinear"``).
    """

    def __init__(self, *, slide: Any, centers_px: np.ndarray, spot_px: float, niche_px: float, patch_px: int,
                 resample: str | int | None = None) -> None:
        self.slide, self.centers = slide, np.asarray(centers_px, np.float64).reshape(-1, 2)
        self.spot_px, self.niche_px, self.patch_px = float(spot_px), float(niche_px), int(patch_px)
        resample_filter(resample)  # a bad name fails here, not in a reader
        self.resample = resample

    def __len__(self) -> int:
        return len(self.centers)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(spot, niche) crops of centre ``i`` as (P, P, 3) uint8."""
        return read_crop_pair(self.slide, self.centers[i], self.spot_px, self.niche_px, self.patch_px,
                              resample=self.resample)

    def read_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """{"spot_image", "niche_image"}: (B, 3, P, P) contiguous uint8 tensors of the centres ``indices``."""
        import torch

        p = self.patch_px
        spot, niche = np.empty((len(indices), p, p, 3), np.uint8), np.empty((len(indices), p, p, 3), np.uint8)
        for j, i in enumerate(indices):
            spot[j], niche[j] = self.read(int(i))
        # numpy's uint8 transpose copy is ~3x faster than torch's permute(...).contiguous()
        return {"spot_image": torch.from_numpy(np.ascontiguousarray(spot.transpose(0, 3, 1, 2))),
                "niche_image": torch.from_numpy(np.ascontiguousarray(niche.transpose(0, 3, 1, 2)))}

    def __getitem__(self, i: int) -> dict[str, Any]:
        batch = self.read_batch([i])
        return {k: v[0] for k, v in batch.items()}


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def reading_plan(device: Any, workers: int, *, cores: int | None = None) -> dict[str, Any]:
    """How crops are read beside the model: ``{"readers": "process"|"thread"|"none", "n": readers,
    "torch_threads": threads for the model (None = unchanged)}``.

    ``workers`` = 0 reads in the main thread. On CUDA, ``workers`` spawned reader processes (the model runs on the
    GPU). On the CPU, ``workers`` reader threads in this process, and the model gets the cores they leave (at
    least one): on a 2-core machine 2 readers + 1 torch thread measured fastest (benchmarks/RESULTS.md).
    """
    import torch

    workers = int(workers)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return {"readers": "none", "n": 0, "torch_threads": None}
    if torch.device(device).type != "cpu":
        return {"readers": "process", "n": workers, "torch_threads": None}
    cores = cores or available_cores()
    return {"readers": "thread", "n": workers,
            "torch_threads": max(1, min(torch.get_num_threads(), cores - min(workers, cores - 1)))}


def thread_batches(crops: SlideCrops, *, batch_size: int, readers: int) -> Iterator[dict[str, Any]]:
    """Batches of ``crops`` in order, read by ``readers`` threads, at most ``readers + 1`` batches ahead.

    The first batch is read in the calling thread, so a backend that decodes a level on first use (plain
    images) does so once, before the readers share it."""
    starts = list(range(0, len(crops), batch_size))
    if not starts:
        return
    indices = [range(s, min(s + batch_size, len(crops))) for s in starts]
    yield crops.read_batch(indices[0])
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="stalign-reader") as pool:
        pending = [pool.submit(crops.read_batch, idx) for idx in indices[1:readers + 2]]
        following = readers + 2
        while pending:
            batch = pending.pop(0).result()
            if following < len(indices):
                pending.append(pool.submit(crops.read_batch, indices[following]))
                following += 1
            yield batch


def crop_batches(crops: SlideCrops, *, batch_size: int, plan: dict[str, Any],
                 pin_memory: bool = False) -> Iterator[dict[str, Any]]:
    """Batches {"spot_image", "niche_image"} of ``crops`` in order, read as ``plan`` (``reading_plan``) says."""
    import torch

    if plan["readers"] == "thread":
        return thread_batches(crops, batch_size=batch_size, readers=plan["n"])
    if plan["readers"] == "process":
        return iter(torch.utils.data.DataLoader(crops, batch_size=batch_size, shuffle=False, num_workers=plan["n"],
                                                pin_memory=pin_memory, multiprocessing_context="spawn"))
    return (crops.read_batch(range(s, min(s + batch_size, len(crops)))) for s in range(0, len(crops), batch_size))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` inside the block (nothing for None), the previous count restored after."""
    import torch

    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
