"""One slide's shard (``write_slide``: tissue call, niche means, neighbours, spot and niche crops read in batches
by the crop workers, QC) and the run over a prep's slides one after another (``write_slides``: a 'spawn' pool of
crop workers that also makes the next slide's tissue mask); ``stalign.data.pipeline.prepare`` builds the jobs."""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data import expression as ex
from stalign.data.crop_spec import CropSpec
from stalign.data.crop_workers import CropPool, close_cached, crop_batches
from stalign.data.errors import CoordinateError, DataPrepError
from stalign.data.prep_qc import write_slide_qc
from stalign.data.prep_signals import check_terminated
from stalign.data.shards import ShardWriter, shard_relpath
from stalign.data.tissue_call import TissueRule, call_tissue
from stofm.util.errors import SetupError
from stofm.util.knn import neighbor_indices


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs to write one slide's shard (picklable; the slide is opened by path)."""

    slide_id: str
    image_path: str
    um_per_px: float
    pixel_size_source: str
    pixel_size_sources: dict[str, float]  # every available source's µm/px (``SlideSample.pixel_size_record``)
    dropped_out_of_image: dict[str, Any]  # the reader's {"count", "barcodes"} (``SlideSample``)
    coords_px: np.ndarray
    expr: np.ndarray
    barcodes: list[str]
    source_files: dict[str, str]
    shard_path: str
    genes: list[str]
    settings: dict[str, Any]
    tissue: TissueRule
    batch_size: int = 32
    progress: bool = True
    compression: str = "none"


def write_slides(jobs: list[SlideJob], *, workers: int, progress: bool,
                 on_done: Callable[[dict[str, Any]], None]) -> list[Exception]:
    """Write the jobs' shards one slide after another, their crops read by ``workers`` processes (this one and a
    'spawn' pool of ``workers - 1``); returns the slides' errors."""
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    failures: list[Exception] = []
    pool = None
    if workers > 1 and jobs:
        pool = CropPool(workers - 1)
    ahead: dict[int, Any] = {}  # job index -> future of its tissue mask, made in the pool one slide ahead
    try:
        with tqdm(total=len(jobs), desc="slides", unit="slide", position=0, disable=not progress or not jobs) as bar:
            for k, job in enumerate(jobs):
                if pool is not None and k + 1 < len(jobs):
                    nxt = jobs[k + 1]
                    ahead[k + 1] = pool.submit(call_tissue, nxt.image_path, nxt.um_per_px, nxt.coords_px,
                                               nxt.tissue, nxt.settings["spot_um"])
                try:
                    check_terminated()
                    on_done(write_slide(job, pool=pool, tissue=ahead.pop(k, None)))
                except (DataPrepError, CoordinateError) as err:  # a slide's bad input: reported with the others
                    failures.append(err)
                except BrokenProcessPool as err:
                    raise SetupError(f"a crop worker process died while preparing {job.slide_id} ({err}); when "
                                     "prepare(workers>1) runs from a script, guard it with "
                                     "`if __name__ == '__main__':`") from err
                bar.update()
        check_terminated()
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        close_cached()
    return failures


def write_slide(job: SlideJob, *, pool: Any = None, tissue: Any = None) -> dict[str, Any]:
    """Tissue filter, niche means, neighbours and crops of one slide into its shard; returns its manifest entry.
    ``tissue``: a future of ``call_tissue`` for this job made in ``pool`` (None: made here)."""
    from tqdm.auto import tqdm

    st = job.settings
    crop = CropSpec.from_dict(st)
    spot_px, niche_px = crop.pixels(job.um_per_px)
    n_in = len(job.coords_px)
    call = tissue.result() if tissue is not None else \
        call_tissue(job.image_path, job.um_per_px, job.coords_px, job.tissue, window_um=crop.spot_um)
    keep, dims = call.keep, call.dims
    if not keep.any():
        raise DataPrepError(f"slide {job.slide_id} ({job.image_path}): none of its {n_in} spots lie on tissue "
                            f"({call.describe()}); check the coordinates and pixel size, or use "
                            "--no-tissue-filter")
    tissue_record = write_slide_qc(Path(job.shard_path).parent.parent, job.slide_id, call, job.coords_px,
                                   job.barcodes)  # qc/ beside shards/
    kept = np.flatnonzero(keep)  # shard rows keep the input order
    xy, expr = job.coords_px[kept], job.expr[kept]
    # crops are read in raster order (bands one spot crop high, then x): neighbours share decoded tiles
    read_order = np.lexsort((xy[:, 0], np.floor(xy[:, 1] / spot_px)))
    um = xy * job.um_per_px
    padded = np.zeros(len(xy), dtype=bool)
    spot_padded = np.zeros(len(xy), dtype=bool)
    entry = {"slide_id": job.slide_id, "shard": shard_relpath(job.slide_id), "n_spots": int(len(xy)),
             "n_input_spots": int(n_in), "um_per_px": job.um_per_px, "pixel_size_source": job.pixel_size_source,
             "pixel_size_sources": job.pixel_size_sources,
             "n_background_dropped": int(n_in - len(xy)), "n_padded": 0, "n_spot_padded": 0, "spot_px": spot_px,
             "niche_px": niche_px, "image_size": dims, "source_files": job.source_files,
             "dropped_out_of_image": job.dropped_out_of_image}
    entry["tissue"] = tissue_record
    batches = [read_order[i:i + job.batch_size] for i in range(0, len(xy), job.batch_size)]
    tasks = [(job.image_path, job.um_per_px, xy[rows], crop, job.compression) for rows in batches]
    with ShardWriter(job.shard_path, slide_id=job.slide_id, n_spots=len(xy), patch_px=crop.patch_px,
                     genes=job.genes, um_per_px=job.um_per_px, compression=job.compression,
                     attrs={"pixel_size_source": job.pixel_size_source, "settings": json.dumps(st)}) as w, \
            tqdm(total=len(xy), desc=job.slide_id, unit="spot", position=1, leave=False,
                 disable=not job.progress) as bar:
        spot_arrays = None
        for i, (spot, niche, pad_s, pad_n) in crop_batches(tasks, pool):
            rows = batches[i]
            w.write_compressed(rows, spot, niche)
            padded[rows] = pad_s | pad_n
            spot_padded[rows] = pad_s
            bar.update(len(rows))
            check_terminated()
            if spot_arrays is None:  # here, not after the crops: the pool's processes are reading meanwhile
                spot_arrays = {"niche_expr": ex.niche_expression(expr, um, st["niche_um"]),
                               "neighbors": neighbor_indices(um, st["n_neighbors"])}
        entry.update(n_padded=int(padded.sum()), n_spot_padded=int(spot_padded.sum()))
        w.set_attr("manifest_entry", json.dumps(entry))
        w.finish(expr=expr, coords_px=xy, coords_um=um, padded=padded, barcodes=[job.barcodes[i] for i in kept],
                 **spot_arrays)
    return entry
