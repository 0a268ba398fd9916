"""Shard writer/reader and manifest: the ARCHITECTURE format, atomic rename, nothing half written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zlib

import h5py
import numpy as np
import pytest
from PIL import Image

from stalign.data import shards
from stalign.data.shards import ShardError, ShardWriter


@pytest.fixture(scope="module")
def real_patches(squidpy_crop):
    """Eight 32 px patches cut from the real H&E (spot) and their 64 px surroundings (niche)."""
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    centres = np.array([[200 + 60 * i, 300 + 40 * i] for i in range(8)], dtype=np.float64)
    spot = np.stack([img[int(y) - 16:int(y) + 16, int(x) - 16:int(x) + 16] for x, y in centres])
    niche = np.stack([img[int(y) - 32:int(y) + 32:2, int(x) - 32:int(x) + 32:2] for x, y in centres])
    return centres, spot, niche


def _write(path, centres, spot, niche, *, fail_after_patches=False):
    n, genes = len(centres), ["Gfap", "Mbp", "Snap25"]
    expr = np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 7
    with ShardWriter(path, slide_id="s1", n_spots=n, patch_px=32, genes=genes, um_per_px=0.5,
                     attrs={"pixel_size_source": "explicit"}) as w:
        w.write_patches(0, spot[:5], niche[:5])
        w.write_patches(5, spot[5:], niche[5:])
        if fail_after_patches:
            raise RuntimeError("disk full")
        w.finish(expr=expr, niche_expr=expr + 1, coords_px=centres, coords_um=centres * 0.5,
                 neighbors=np.tile(np.arange(n, dtype=np.int32)[:, None], (1, 4)),
                 padded=np.arange(n) % 3 == 0, barcodes=[f"BC{i}-1" for i in range(n)])
    return expr


def test_shard_round_trip_has_the_documented_layout(tmp_path, real_patches):
    centres, spot, niche = real_patches
    path = tmp_path / "shards" / "s1.h5"
    expr = _write(path, centres, spot, niche)
    assert sorted(os.listdir(path.parent)) == ["s1.h5"]  # no temporary left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not the owner-only mode of the temporary
    with h5py.File(path) as f:
        assert f["spot_patches"].dtype == np.uint8 and f["spot_patches"].shape == (8, 32, 32, 3)
        assert f["spot_patches"].chunks == (1, 32, 32, 3)  # one chunk per spot: random access
        assert f["niche_patches"].chunks == (1, 32, 32, 3)
        assert f["expr"].dtype == np.float16 and f["niche_expr"].dtype == np.float16
        assert f["coords_px"].dtype == np.float64 and f["coords_um"].dtype == np.float32
        assert f["neighbors"].dtype == np.int32 and f["padded"].dtype == bool
    data = shards.read_shard(path, patches=True)
    np.testing.assert_array_equal(data["spot_patches"], spot)
    np.testing.assert_array_equal(data["niche_patches"], niche)
    np.testing.assert_allclose(data["expr"], expr, rtol=1e-3)
    np.testing.assert_array_equal(data["coords_px"], centres)
    assert data["barcodes"] == [f"BC{i}-1" for i in range(8)]
    assert data["padded"].tolist() == [i % 3 == 0 for i in range(8)]
    a = data["attrs"]
    assert a["slide_id"] == "s1" and a["um_per_px"] == 0.5 and a["genes"] == ["Gfap", "Mbp", "Snap25"]
    assert a["pixel_size_source"] == "explicit" and a["complete"] and a["n_spots"] == 8
    assert shards.shard_attrs(path)["n_spots"] == 8


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_precompressed_chunks_read_back_as_the_crops(tmp_path, real_patches, compression):
    centres, spot, niche = real_patches
    path = tmp_path / "s1.h5"
    rows = [6, 2, 0, 7, 1, 3, 5, 4]
    with ShardWriter(path, slide_id="s1", n_spots=8, patch_px=32, genes=["A"], um_per_px=1,
                     compression=compression) as w:
        w.write_compressed(rows, [shards.encode_patch(spot[r], compression) for r in rows],
                           [shards.encode_patch(niche[r], compression) for r in rows])
        w.finish(expr=np.zeros((8, 1)), niche_expr=np.zeros((8, 1)), coords_px=centres, coords_um=centres,
                 neighbors=np.zeros((8, 1)), padded=np.zeros(8), barcodes=list("abcdefgh"))
    with h5py.File(path) as f:  # a standard gzip filter or raw chunks: any HDF5 reader decodes them
        np.testing.assert_array_equal(f["spot_patches"][()], spot)
        np.testing.assert_array_equal(f["niche_patches"][()], niche)
        if compression == "gzip":
            assert f["spot_patches"].compression == "gzip" and f["spot_patches"].compression_opts == 1
            assert f["spot_patches"].id.get_storage_size() < spot.nbytes
        else:
            assert f["spot_patches"].compression is None
            assert f["spot_patches"].id.get_storage_size() == spot.nbytes


def test_encode_patch_gzip_inflates_to_the_raw_bytes_and_bad_codecs_fail(real_patches):
    patch = real_patches[1][0]
    assert zlib.decompress(shards.encode_patch(patch, "gzip")) == patch.tobytes()
    assert shards.encode_patch(patch, "none") == patch.tobytes()
    with pytest.raises(ValueError, match="patch compression must be one of none, gzip"):
        shards.encode_patch(patch, "lz4")


def test_failed_write_leaves_nothing(tmp_path, real_patches):
    path = tmp_path / "s1.h5"
    with pytest.raises(RuntimeError, match="disk full"):
        _write(path, *real_patches, fail_after_patches=True)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ShardError, match="shard not found"):
        shards.read_shard(path)
    path.write_bytes(b"not an HDF5 file")  # a damaged file under the final name
    with pytest.raises(ShardError, match="s1.h5: shard is incomplete or unreadable"):
        shards.read_shard(path)


def test_mismatched_rows_are_refused_and_leave_nothing(tmp_path, real_patches):
    centres, spot, niche = real_patches
    with pytest.raises(ShardError, match="coords_px has 7 rows, expected 8"):
        with ShardWriter(tmp_path / "s1.h5", slide_id="s1", n_spots=8, patch_px=32, genes=["A"], um_per_px=1) as w:
            w.write_patches(0, spot, niche)
            w.finish(expr=np.zeros((8, 1)), niche_expr=np.zeros((8, 1)), coords_px=centres[:7],
                     coords_um=centres, neighbors=np.zeros((8, 1)), padded=np.zeros(8), barcodes=list("abcdefgh"))
    assert os.listdir(tmp_path) == []


def test_killed_writer_never_leaves_a_shard_under_the_final_name(tmp_path, subprocess_env):
    """SIGKILL a process in the middle of writing: the final name never appears, a temporary may."""
    code = (
        "import numpy as np, time, sys\n"
        "from stalign.data.shards import ShardWriter\n"
        "with ShardWriter(sys.argv[1], slide_id='s', n_spots=100, patch_px=64, genes=['A'], um_per_px=1) as w:\n"
        "    for i in range(100):\n"
        "        w.write_patches(i, np.full((1, 64, 64, 3), i, np.uint8), np.zeros((1, 64, 64, 3), np.uint8))\n"
        "        if i == 10: print('writing', flush=True)\n"
        "        time.sleep(0.05)\n"
    )
    target = tmp_path / "s.h5"
    proc = subprocess.Popen([sys.executable, "-c", code, str(target)], env=subprocess_env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.1)
    assert not target.exists()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(f".s.h5.{proc.pid}.") and left.endswith(".tmp")
    assert shards.shard_attrs(target) is None
    # the next writer of this shard removes the dead writer's temporary, never a live writer's
    live = tmp_path / f".s.h5.{os.getpid()}.abc.tmp"
    live.write_bytes(b"")
    assert shards.remove_stale_temporaries(target) == [tmp_path / left]
    assert os.listdir(tmp_path) == [live.name]


def test_incomplete_file_is_not_taken_as_a_shard(tmp_path):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("expr", data=np.zeros((2, 2)))
    assert shards.shard_attrs(path) is None
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    assert shards.shard_attrs(tmp_path / "junk.h5") is None
    with pytest.raises(ShardError, match="incomplete"):
        shards.read_shard(path)


def test_manifest_is_replaced_atomically_and_validated(tmp_path):
    m = {"format": shards.FORMAT, "version": shards.VERSION, "genes": ["A", "B"], "slides": []}
    shards.write_manifest(tmp_path, m)
    assert shards.read_manifest(tmp_path) == m
    m2 = dict(m, genes=["C"])
    shards.write_manifest(tmp_path, m2)
    assert json.loads((tmp_path / "manifest.json").read_text())["genes"] == ["C"]
    assert os.listdir(tmp_path) == ["manifest.json"]
    with pytest.raises(ShardError, match="no manifest"):
        shards.read_manifest(tmp_path / "nowhere")
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ShardError, match="not a stalign-shards manifest"):
        shards.read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{oops")
    with pytest.raises(ShardError, match="not valid JSON"):
        shards.read_manifest(tmp_path)
