"""Crop reading in worker processes for ``stalign prep``: a 'spawn' pool whose workers die with their parent,
each worker keeping its slide open between batches, results handed back in task order with a bounded window."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np

from stalign.data.shards import compress_patch


def crop_pool(workers: int) -> Any:
    """A 'spawn' process pool of ``workers`` crop readers that end as soon as this process does."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


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
               patch_px: int) -> tuple[list[bytes], list[bytes], np.ndarray, np.ndarray]:
    """Spot and niche crops of a batch of centres, compressed as shard chunks, and whether each was padded
    (a worker task: the process opens the slide itself, once, and keeps it open for the next batch)."""
    from stalign.data.slide import open_slide

    slide = _OPEN.get(image_path)
    if slide is None:
        close_cached()
        slide = _OPEN[image_path] = open_slide(image_path, um_per_px=um_per_px)
    spot, pad_s = slide.read_crops(centres, spot_px, patch_px)
    niche, pad_n = slide.read_crops(centres, niche_px, patch_px)
    return [compress_patch(x) for x in spot], [compress_patch(x) for x in niche], pad_s, pad_n


def close_cached() -> None:
    for slide in _OPEN.values():
        slide.close()
    _OPEN.clear()


def crop_batches(tasks: list[tuple], pool: Any, window: int) -> Iterator[tuple]:
    """``read_batch`` results in task order; at most ``window`` tasks in flight on ``pool``."""
    if pool is None:
        yield from (read_batch(*t) for t in tasks)
        return
    pending: deque = deque()
    todo = iter(tasks)
    pending.extend(pool.submit(read_batch, *t) for t in islice(todo, window))
    while pending:
        result = pending.popleft().result()
        pending.extend(pool.submit(read_batch, *t) for t in islice(todo, 1))
        yield result
