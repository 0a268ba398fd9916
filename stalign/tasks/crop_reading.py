"""Reading the (spot, niche) crop pairs of a slide for embedding, in batches read by reader threads (CPU) or
reader processes (GPU).

Crops are cut by the one crop reader of prep and prediction (``stalign.data.crop_spec.read_crop_pairs``: those of
``Slide.read_crop``, best pyramid level, white outside the image) with the model's ``CropSpec``.

Why threads on the CPU: openslide's decoding and PIL's resampling release the GIL, so reader threads overlap
with the model in one process, without the start-up cost of spawned processes; the model gets the cores the
readers leave (``reading_plan``), because torch threads that share a core with a reader wait on each other.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec, read_crop_pairs
from stalign.data.errors import PixelSizeError
from stofm.util.errors import InputError


class SlideCrops:
    """Map-style dataset of (spot, niche) uint8 crops (3, P, P) of ``crop`` around level-0 centres of one slide.

    Picklable: each DataLoader worker re-opens the slide by path (``Slide`` pickles as path + pixel size).
    """

    def __init__(self, *, slide: Any, centers_px: np.ndarray, crop: CropSpec) -> None:
        if slide.um_per_px is None:
            raise PixelSizeError(f"{slide.path}: crops are cut at fixed µm and need the slide's pixel size")
        self.slide, self.centers, self.crop = slide, np.asarray(centers_px, np.float64).reshape(-1, 2), crop

    def __len__(self) -> int:
        return len(self.centers)

    def read_batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """{"spot_image", "niche_image"}: (B, 3, P, P) contiguous uint8 tensors of the centres ``indices``."""
        import torch

        spot, niche, _, _ = read_crop_pairs(self.slide, self.centers[np.asarray(indices, dtype=np.int64)], self.crop)
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
        raise InputError(f"workers must be >= 0, got {workers}")
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
