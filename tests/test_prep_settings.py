"""Prep speed settings keep the outputs: patch storage (raw vs gzip, lossless), the resampling filter (recorded in
the manifest, old manifests mean Lanczos), crops cut from shared reads, the parent reading with its workers."""
from __future__ import annotations

import json
import math

import h5py
import numpy as np
import pytest
from PIL import Image

from stalign.data import shards
from stalign.data.crop_spec import CropSpec
from stalign.data.crop_workers import _split, _take
from stalign.data.errors import DataPrepError
from stalign.data.pipeline import prepare
from stalign.data.readers import read_anndata_image

# the real Visium crop at its own pixel size (0.615 µm/px): both crops are resampled
CROP = CropSpec(spot_um=112.0, niche_um=336.0, patch_px=48)  # bilinear, the default filter
LANCZOS = CROP.with_overrides(resample="lanczos")
REAL = {"n_neighbors": 4, "n_top_genes": 10, "progress": False}
#: Antialiased bilinear vs Lanczos crops of the same spots, 48 px: mean absolute difference per patch in grey
#: levels (measured 1.6-4.0 on the real crop; Lanczos is the sharper of the two).
FILTER_TOLERANCE = 6.0


def _sample(squidpy_crop, slide_id="crop"):
    return read_anndata_image(squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg", slide_id=slide_id)


def _patches(out, key):
    with h5py.File(out / "shards" / "crop.h5") as f:
        return f[key][()], f[key].compression, f["coords_px"][()]


def _lanczos_by_hand(img, xy, size, out_px):
    """Each crop resampled by PIL from the whole image (white outside), as the pre-grouping reader did."""
    h, w = img.shape[:2]
    pad = 40 + math.ceil(size)
    canvas = np.full((h + 2 * pad, w + 2 * pad, 3), 255, np.uint8)
    canvas[pad:pad + h, pad:pad + w] = img
    out = []
    for cx, cy in xy:
        x0, y0 = cx - size / 2, cy - size / 2
        margin = math.ceil(3 * max(size / out_px, 1.0)) + 1
        ix, iy = math.floor(x0) - margin, math.floor(y0) - margin
        n, m = math.ceil(x0 + size) + margin - ix, math.ceil(y0 + size) + margin - iy
        region = Image.fromarray(canvas[iy + pad:iy + pad + m, ix + pad:ix + pad + n])
        box = (x0 - ix, y0 - iy, x0 - ix + size, y0 - iy + size)
        out.append(np.asarray(region.resize((out_px, out_px), Image.Resampling.LANCZOS, box=box)))
    return np.stack(out)


def test_storage_is_lossless_and_lanczos_crops_are_unchanged(tmp_path, squidpy_crop):
    old = prepare([_sample(squidpy_crop)], tmp_path / "old", crop=LANCZOS, patch_compression="gzip", **REAL)
    raw = prepare([_sample(squidpy_crop)], tmp_path / "raw", crop=LANCZOS, **REAL, workers=2)
    assert old["resample"] == raw["resample"] == "lanczos"
    assert (old["patch_compression"], raw["patch_compression"]) == ("gzip", "none")
    for key in ("spot_patches", "niche_patches"):
        a, codec_a, xy = _patches(tmp_path / "old", key)
        b, codec_b, _ = _patches(tmp_path / "raw", key)
        assert (codec_a, codec_b) == ("gzip", None)
        np.testing.assert_array_equal(a, b, err_msg=key)  # raw storage and two readers: bit-identical
        # and both equal each crop resampled on its own from the decoded image (grouped reads change nothing)
        um = old["slides"][0]["um_per_px"]
        img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
        size = (CROP.spot_um if key == "spot_patches" else CROP.niche_um) / um
        np.testing.assert_array_equal(a, _lanczos_by_hand(img, xy, size, CROP.patch_px), err_msg=key)
    assert (tmp_path / "raw/shards/crop.h5").stat().st_size > (tmp_path / "old/shards/crop.h5").stat().st_size
    assert (tmp_path / "raw/shards/crop.h5").stat().st_size < 1.05 * 2 * a.nbytes  # not larger than raw patches


def test_bilinear_is_the_default_and_close_to_lanczos(tmp_path, squidpy_crop):
    prepare([_sample(squidpy_crop)], tmp_path / "lz", crop=LANCZOS, **REAL)
    bl = prepare([_sample(squidpy_crop)], tmp_path / "bl", crop=CropSpec(spot_um=112.0, niche_um=336.0, patch_px=48),
                 **REAL)
    assert bl["resample"] == "bilinear" and json.loads(
        shards.shard_attrs(tmp_path / "bl/shards/crop.h5")["settings"])["resample"] == "bilinear"
    for key in ("spot_patches", "niche_patches"):
        a = _patches(tmp_path / "lz", key)[0].astype(np.float64)
        b = _patches(tmp_path / "bl", key)[0].astype(np.float64)
        per_patch = np.abs(a - b).mean(axis=(1, 2, 3))
        assert not np.array_equal(a, b)
        assert per_patch.max() < FILTER_TOLERANCE, (key, per_patch.max())


def test_old_manifests_mean_lanczos_and_resume(tmp_path, squidpy_crop):
    out = tmp_path / "old"
    prepare([_sample(squidpy_crop)], out, crop=LANCZOS, patch_compression="gzip", **REAL)
    # make it a folder written before the setting existed: no "resample" in the manifest or the shard
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["resample"], manifest["patch_compression"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with h5py.File(out / "shards/crop.h5", "a") as f:
        settings = json.loads(f.attrs["settings"])
        del settings["resample"]
        f.attrs["settings"] = json.dumps(settings)
    mtime = (out / "shards/crop.h5").stat().st_mtime_ns
    logs = []
    again = prepare([_sample(squidpy_crop)], out, log=logs.append, **REAL)  # no filter asked: the folder's
    assert again["resample"] == "lanczos" and "crop: shard complete, skipped" in logs
    assert (out / "shards/crop.h5").stat().st_mtime_ns == mtime
    with pytest.raises(DataPrepError, match="resample='lanczos', this run asks for 'bilinear'"):
        prepare([_sample(squidpy_crop)], out, crop=CROP, **REAL)
    with pytest.raises(DataPrepError, match="resample must be one of bilinear, lanczos"):
        prepare([_sample(squidpy_crop)], tmp_path / "bad", crop=CROP.with_overrides(resample="cubic"), **REAL)
    with pytest.raises(DataPrepError, match="patch compression must be one of none, gzip"):
        prepare([_sample(squidpy_crop)], tmp_path / "bad", crop=CROP, patch_compression="lz4", **REAL)


def test_cli_flags_reach_the_manifest(tmp_path, squidpy_crop, capsys):
    from stalign.cli import main

    assert main(["prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
                 "--out", str(tmp_path), "--n-top-genes", "5", "--patch-px", "32", "--resample", "lanczos",
                 "--patch-compression", "gzip", "--quiet"]) == 0
    m = shards.read_manifest(tmp_path)
    assert (m["resample"], m["patch_compression"]) == ("lanczos", "gzip")


def test_runs_split_contiguously_and_idle_processes_steal_from_the_back():
    runs = _split(10, 3)
    assert [list(r) for r in runs] == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9]]
    taken = [_take(runs, 0) for _ in range(3)]
    assert taken == [0, 1, 2]
    assert _take(runs, 0) == 6  # own run empty: the back of the longest other run
    assert list(runs[1]) == [3, 4, 5]
    rest = sorted(i for i in iter(lambda: _take(runs, 2), None))
    assert rest == [3, 4, 5, 7, 8, 9] and _take(runs, 1) is None


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_pool_results_equal_reads_in_this_process_and_shared_memory_has_no_name(squidpy_crop, compression):
    """A pool process hands raw crops back through shared memory (gzip chunks through the pipe): every batch's
    chunks equal the same batch read in this process; the shared memory has no name left once both map it."""
    from multiprocessing.shared_memory import SharedMemory

    from stalign.data.crop_workers import CropPool, close_cached, crop_batches, read_batch

    sample = _sample(squidpy_crop)
    xy, um = np.asarray(sample.coords_px), float(sample.um_per_px)
    crop = CropSpec(spot_um=112.0, niche_um=336.0, patch_px=40)
    tasks = [(str(sample.image_path), um, xy[i:i + 8], crop, compression) for i in range(0, len(xy), 8)]
    pool = CropPool(1)
    try:
        got = {}
        for i, (spot, niche, pad_s, pad_n) in crop_batches(tasks, pool):  # chunks valid until the next item
            got[i] = ([bytes(np.ascontiguousarray(c)) for c in spot], [bytes(np.ascontiguousarray(c)) for c in niche],
                      pad_s.copy(), pad_n.copy())
        names = [shm.name for shm in pool._slots]
        for name in names:  # mapped by both processes and already unlinked: a kill -9 of both leaves nothing
            with pytest.raises(FileNotFoundError):
                SharedMemory(name=name)
    finally:
        pool.shutdown()
        close_cached()
    assert sorted(got) == list(range(len(tasks)))
    assert bool(names) == (compression == "none")  # raw crops of the pool process came through shared memory
    for i, task in enumerate(tasks):
        spot, niche, pad_s, pad_n = read_batch(*task)
        assert got[i][0] == [bytes(np.ascontiguousarray(c)) for c in spot]
        assert got[i][1] == [bytes(np.ascontiguousarray(c)) for c in niche]
        np.testing.assert_array_equal(got[i][2], pad_s)
        np.testing.assert_array_equal(got[i][3], pad_n)
    close_cached()


def test_read_crops_into_a_buffer_of_the_wrong_shape_is_refused(squidpy_crop):
    from stalign.data.slide import open_slide

    with open_slide(squidpy_crop / "test_img.jpg", um_per_px=1.0) as slide:
        good = np.empty((2, 16, 16, 3), dtype=np.uint8)
        crops, _ = slide.read_crops([[300, 300], [500, 500]], 40, 16, out=good)
        assert crops is good and good.any()
        with pytest.raises(ValueError, match=r"expected uint8 \(2, 16, 16, 3\)"):
            slide.read_crops([[300, 300], [500, 500]], 40, 16, out=np.empty((2, 16, 16, 4), dtype=np.uint8))
