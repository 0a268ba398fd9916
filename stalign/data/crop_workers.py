"""Crop reading in worker processes for ``stalign prep``: a 'spawn' pool whose workers die with their parent,
each worker keeping its slide open between batches; the parent reads too, every process works through its own
contiguous run of batches, results are handed back as they finish (at most two waiting per worker)."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from stalign.data.shards import encode_patch


class CropPool:
    """``workers`` reader processes ('spawn', each ending as soon as this process does), one single-process
    executor each, so a run of neighbouring batches can be sent to the same process (its decoded-tile cache)."""

    def __init__(self, workers: int):
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("spawn")
        self.executors = [ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=die_with_parent,
                                              initargs=(os.getpid(),)) for _ in range(int(workers))]

    def shutdown(self, cancel_futures: bool = True) -> None:
        for ex in self.executors:
            ex.shutdown(cancel_futures=cancel_futures)


def crop_pool(workers: int) -> CropPool:
    """A :class:`CropPool` of ``workers`` crop-reading processes."""
    return CropPool(workers)


def die_with_parent(parent_pid: int) -> None:
    """Crop-worker initializer: end this process as soon as its parent is gone (``kill -9`` of a prep), instead
    of staying blocked in a pipe write: Linux's parent-death signal, and a watcher thread everywhere."""
    import signal
    import threading
    import time

    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


_OPEN: dict[str, Any] = {}  # per process: the slide the last crop task used


def read_batch(image_path: str, um_per_px: float, centres: np.ndarray, spot_px: float, niche_px: float,
               patch_px: int, resample: str = "lanczos",
               compression: str = "gzip") -> tuple[list[bytes], list[bytes], np.ndarray, np.ndarray]:
    """Spot and niche crops of a batch of centres (resampled with ``resample``), encoded as shard chunks
    (``encode_patch`` with ``compression``), and whether each was padded (a worker task: the process opens the
    slide itself, once, and keeps it open for the next batch)."""
    from stalign.data.slide import open_slide

    slide = _OPEN.get(image_path)
    if slide is None:
        close_cached()
        slide = _OPEN[image_path] = open_slide(image_path, um_per_px=um_per_px)
    spot, pad_s = slide.read_crops(centres, spot_px, patch_px, resample=resample)
    niche, pad_n = slide.read_crops(centres, niche_px, patch_px, resample=resample)
    return ([encode_patch(x, compression) for x in spot], [encode_patch(x, compression) for x in niche],
            pad_s, pad_n)


def close_cached() -> None:
    for slide in _OPEN.values():
        slide.close()
    _OPEN.clear()


def _split(n: int, parts: int) -> list[deque]:
    """``range(n)`` as ``parts`` contiguous runs (deques), as equal as can be."""
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [deque(range(bounds[i], bounds[i + 1])) for i in range(parts)]


def _take(runs: list[deque], mine: int) -> int | None:
    """The next task of run ``mine`` (from its front); when it is empty, one stolen from the back of the longest
    other run (its owner keeps its front, so both stay on neighbouring batches); None when all are done."""
    if runs[mine]:
        return runs[mine].popleft()
    longest = max(runs, key=len)
    return longest.pop() if longest else None


def crop_batches(tasks: list[tuple], pool: CropPool | None, in_flight: int = 2) -> Iterator[tuple[int, tuple]]:
    """(task index, ``read_batch`` result) for every task, in the order they finish.

    The tasks (batches in raster order) are split into one contiguous run per process, this one included, so each
    process reads neighbouring batches whose crops share decoded tiles (interleaved batches made every process
    decode nearly every tile); a process whose run is done takes batches from the end of the longest other run.
    At most ``in_flight`` results per pool process wait to be written."""
    from concurrent.futures import FIRST_COMPLETED, wait

    if pool is None:
        yield from ((i, read_batch(*t)) for i, t in enumerate(tasks))
        return
    runs = _split(len(tasks), len(pool.executors) + 1)  # run 0: this process
    pending: dict[Any, tuple[int, int]] = {}  # future -> (task, executor)
    load = [0] * len(pool.executors)
    while True:
        for w, ex in enumerate(pool.executors):
            while load[w] < in_flight and (i := _take(runs, w + 1)) is not None:
                pending[ex.submit(read_batch, *tasks[i])] = (i, w)
                load[w] += 1
        finished = [f for f in pending if f.done()]
        if not finished:
            i = _take(runs, 0)
            if i is not None:
                yield i, read_batch(*tasks[i])
                continue
            if not pending:
                return
            finished = list(wait(list(pending), return_when=FIRST_COMPLETED).done)
        for f in finished:
            i, w = pending.pop(f)
            load[w] -= 1
            yield i, f.result()
