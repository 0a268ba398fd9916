"""Crop reading in worker processes for ``stalign prep``: a 'spawn' pool whose workers die with their parent,
each worker keeping its slide open between batches; the parent reads too, every process works through its own
contiguous run of batches, results are handed back as they finish (at most two waiting per worker; raw
crops in shared memory).

The pool's processes are started (and their slide readers imported) as soon as it is made, while the parent
still prepares its first slide, and the next slide's tissue mask is made in the pool while the parent works on
this slide: on two cores the parent's serial steps then cost one core, not both."""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

from stalign.data.crop_spec import CropSpec, read_crop_pairs
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
        for ex in self.executors:  # a process starts at its first task: start them now, not at the first batch
            ex.submit(warm_up)
        self._slots: list[Any] = []  # shared memory the workers write raw crops into
        self._free: list[Any] = []

    def submit(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` in the pool's first process (a future)."""
        return self.executors[0].submit(fn, *args)

    def take_slot(self, nbytes: int, count: int = 1) -> Any:
        """A shared-memory slot (``SharedMemory``) of at least ``nbytes``, reused after :meth:`give_back`; when none
        is free, ``count`` new ones are made (one per batch that may be in flight)."""
        for k, shm in enumerate(self._free):
            if shm.size >= nbytes:
                return self._free.pop(k)
        self._add_slots(nbytes, max(1, count))
        return self._free.pop()

    def _add_slots(self, nbytes: int, count: int) -> None:
        """``count`` slots, mapped by every pool process and then unlinked: no name is left in /dev/shm, and the
        memory goes with the last process mapping it, also when the whole process group is killed (-9)."""
        from multiprocessing.shared_memory import SharedMemory

        new = [SharedMemory(create=True, size=int(nbytes)) for _ in range(count)]
        try:
            for attached in [ex.submit(attach_slots, [shm.name for shm in new]) for ex in self.executors]:
                attached.result()
        finally:
            for shm in new:
                shm.unlink()
        self._slots += new
        self._free += new

    def give_back(self, shm: Any) -> None:
        self._free.append(shm)

    def shutdown(self, cancel_futures: bool = True) -> None:
        """Stop the processes and unmap the shared memory (freed when the last view of it is gone)."""
        for ex in self.executors:
            ex.shutdown(cancel_futures=cancel_futures)
        for shm in self._slots:
            try:
                shm.close()
            except BufferError:  # a view is still referenced (an exception's traceback): unmapped with it
                pass
        self._slots, self._free = [], []


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


def warm_up() -> int:
    """First task of a pool process: import the slide readers before the first batch arrives."""
    import PIL.Image  # noqa: F401

    import stalign.data.slide  # noqa: F401
    import stalign.data.tissue  # noqa: F401

    return os.getpid()


#: Decoded-tile cache of a crop-reading slide handle (openslide's default is 32 MiB). Neighbouring crops of a batch
#: are cut from one shared read, so little is read twice across batches: on a 40,000² slide (10,000 spots) 8 MiB
#: took the same CPU time as 32 (38.2-38.5 vs 37.0-38.5 s) for 25 MiB less per process (docs/performance.md).
CROP_TILE_CACHE = 8 << 20

_OPEN: dict[str, Any] = {}  # per process: the slide the last crop task used
_ATTACHED: dict[str, Any] = {}  # per pool process: shared-memory slots of the parent, by name


def read_batch(image_path: str, um_per_px: float, centres: np.ndarray, crop: CropSpec, compression: str = "gzip",
               out: str | None = None) -> tuple[list[Any] | None, list[Any] | None, np.ndarray, np.ndarray]:
    """Spot and niche crops of ``crop`` around a batch of centres (``read_crop_pairs``) as shard chunks, and
    whether each was padded (a worker task: the process opens the slide itself, once, and keeps it open for the
    next batch). Chunks are ``encode_patch`` bytes for ``compression="gzip"``, the crops' own (P, P, 3) rows for raw
    storage, or, with ``out`` (the name of a shared-memory slot of the parent, raw storage), written into the
    slot as (2, N, P, P, 3) and returned as None: 9.6 MB per batch of 32 no longer goes through a pipe."""
    from stalign.data.slide import open_slide

    slide = _OPEN.get(image_path)
    if slide is None:
        close_cached()
        slide = _OPEN[image_path] = open_slide(image_path, um_per_px=um_per_px)
        slide.set_tile_cache(CROP_TILE_CACHE)
    buf = None if out is None else slot_array(_ATTACHED[out], len(centres), crop.patch_px)
    spot, niche, pad_s, pad_n = read_crop_pairs(slide, centres, crop, out=buf)
    if out is not None:
        return None, None, pad_s, pad_n
    if compression == "none":
        return list(spot), list(niche), pad_s, pad_n
    return ([encode_patch(x, compression) for x in spot], [encode_patch(x, compression) for x in niche],
            pad_s, pad_n)


def slot_array(shm: Any, n: int, patch_px: int) -> np.ndarray:
    """The (2, n, P, P, 3) uint8 spot + niche crops held at the start of a shared-memory slot."""
    return np.ndarray((2, n, patch_px, patch_px, 3), dtype=np.uint8, buffer=shm.buf)


def attach_slots(names: list[str]) -> int:
    """Pool task: map the parent's new shared-memory slots (by name, before the parent unlinks the names)."""
    from multiprocessing.shared_memory import SharedMemory

    for name in names:  # spawned children share the parent's resource tracker: registering again is a no-op
        if name not in _ATTACHED:
            _ATTACHED[name] = SharedMemory(name=name)
    return len(names)


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
    At most ``in_flight`` results per pool process wait to be written. Raw crops of pool processes arrive in
    shared memory: the chunks yielded are views of it, valid until the next item is asked for."""
    from concurrent.futures import FIRST_COMPLETED, wait

    if pool is None:
        yield from ((i, read_batch(*t)) for i, t in enumerate(tasks))
        return
    runs = _split(len(tasks), len(pool.executors) + 1)  # run 0: this process
    pending: dict[Any, tuple[int, int, Any, Any]] = {}  # future -> (task, executor, slot, its crops) or Nones
    load = [0] * len(pool.executors)
    while True:
        for w, ex in enumerate(pool.executors):
            while load[w] < in_flight and (i := _take(runs, w + 1)) is not None:
                _, _, centres, crop, compression = tasks[i]
                patch_px = crop.patch_px
                slot = crops = None
                if compression == "none":
                    slot = pool.take_slot(2 * len(centres) * patch_px * patch_px * 3,
                                          count=in_flight * len(pool.executors))
                    crops = slot_array(slot, len(centres), patch_px)
                future = ex.submit(read_batch, *tasks[i], *(() if slot is None else (slot.name,)))
                pending[future] = (i, w, slot, crops)
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
            i, w, slot, crops = pending.pop(f)
            load[w] -= 1
            spot, niche, pad_s, pad_n = f.result()
            if slot is not None:
                spot, niche = list(crops[0]), list(crops[1])
            yield i, (spot, niche, pad_s, pad_n)
            if slot is not None:
                del spot, niche, crops
                pool.give_back(slot)
