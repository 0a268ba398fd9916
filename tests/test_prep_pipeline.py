"""``prepare`` / ``stalign prep`` end to end on real files: crop contents, panel, niche means, resume, workers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from stalign.data import shards
from stalign.data.crop_spec import CropSpec
from stalign.data.errors import DataPrepError, GeneNameError
from stalign.data.pipeline import prepare
from stalign.data.readers import read_anndata_image, read_spaceranger
from stalign.data.shards import read_manifest

# 1 µm/px (explicit flag) so a 64 µm spot crop at 64 px is an exact, unresampled read of the JPEG
SMALL = {"crop": CropSpec(spot_um=64.0, niche_um=500.0, patch_px=64), "n_neighbors": 6, "progress": False}


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory, squidpy_crop):
    """The real crop, and a mirrored copy of it (image flipped left-right, x coordinates mirrored)."""
    import anndata as ad

    d = tmp_path_factory.mktemp("mirror")
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    Image.fromarray(np.ascontiguousarray(img[:, ::-1])).save(d / "mirror.png")
    a = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    a.obsm["spatial"] = a.obsm["spatial"] * [-1, 1] + [img.shape[1], 0]  # pixel column c -> W - 1 - c
    a.write_h5ad(d / "mirror.h5ad")
    return {"crop": (squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg"),
            "mirror": (d / "mirror.h5ad", d / "mirror.png")}


def _samples(two_slides, names=("crop", "mirror"), **kw):
    return [read_anndata_image(*two_slides[n], slide_id=n, um_per_px=1.0, crop_um=500, **kw) for n in names]


def _shard_files(out):
    return sorted(os.listdir(out / "shards")) if (out / "shards").exists() else []


def test_crop_end_to_end(tmp_path, two_slides, squidpy_crop):
    import anndata as ad

    (sample,) = _samples(two_slides, ["crop"])
    m = prepare([sample], tmp_path, n_top_genes=25, **SMALL)
    assert m == shards.read_manifest(tmp_path)
    assert m["expression"] == "as_given" and m["patch_px"] == 64 and m["spot_um"] == 64.0
    (entry,) = m["slides"]
    assert entry["um_per_px"] == 1.0 and entry["pixel_size_source"] == "user flag"
    assert entry["n_spots"] + entry["n_background_dropped"] == 49
    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    x = adata.X.toarray()
    # panel: the 25 genes of largest variance, largest first, ties by name
    var = x.astype(np.float64).var(0)
    assert m["genes"] == sorted(adata.var_names, key=lambda g: (-var[adata.var_names.get_loc(g)], g))[:25]
    data = shards.read_shard(tmp_path / entry["shard"], patches=True)
    n = entry["n_spots"]
    assert data["spot_patches"].shape == data["niche_patches"].shape == (n, 64, 64, 3)
    assert data["expr"].shape == (n, 25) and data["neighbors"].shape == (n, 6)
    rows = [adata.obs_names.get_loc(b) for b in data["barcodes"]]
    cols = [adata.var_names.get_loc(g) for g in m["genes"]]
    np.testing.assert_allclose(data["expr"], x[np.ix_(rows, cols)], rtol=1e-3, atol=1e-3)  # float16 of the input
    xy = adata.obsm["spatial"][rows].astype(np.float64)
    np.testing.assert_array_equal(data["coords_px"], xy)
    assert rows == sorted(rows)  # the input order (the crops are read in raster order)
    np.testing.assert_allclose(data["coords_um"], xy)
    # niche mean by hand: spots within ±250 µm (= px here) in x and y
    i = 20
    inside = np.all(np.abs(xy - xy[i]) <= 250, axis=1)
    assert 1 < inside.sum() < n
    np.testing.assert_allclose(data["niche_expr"][i], x[np.ix_(rows, cols)][inside].mean(0), rtol=2e-3, atol=2e-3)
    # spot patch = the 64x64 px region read straight from the JPEG
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    cx, cy = xy[i].astype(int)
    np.testing.assert_array_equal(data["spot_patches"][i], img[cy - 32:cy + 32, cx - 32:cx + 32])
    # padding: the 500 px niche crop leaves the 950x1717 image near its border
    h, w = img.shape[:2]
    out_of_image = (xy[:, 0] - 250 < 0) | (xy[:, 1] - 250 < 0) | (xy[:, 0] + 250 > w) | (xy[:, 1] + 250 > h)
    np.testing.assert_array_equal(data["padded"], out_of_image)
    assert entry["n_padded"] == out_of_image.sum() > 0
    # neighbours: self first, then the nearest
    np.testing.assert_array_equal(data["neighbors"][:, 0], np.arange(n))
    d = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    np.testing.assert_allclose(d[i, data["neighbors"][i]], np.sort(d[i])[:6])
    assert entry["source_files"] == {str(p.resolve()): shards_sha(p) for p in two_slides["crop"]}


def shards_sha(path):
    from stofm.util.safe_files import sha256_of

    return sha256_of(path)


def test_raw_counts_are_log_normalised_over_all_genes(tmp_path, fetched):
    """Real Space Ranger counts (100 spots x 100 genes); its hires image is an all-black placeholder, hence
    no tissue filter."""
    sample = read_spaceranger(fetched("squidpy-spaceranger"))
    counts = sample.adata.X.toarray()
    m = prepare([sample], tmp_path, n_top_genes=10, crop=CropSpec(patch_px=32), progress=False,
                tissue_filter=False)
    assert m["expression"] == "log1p_cp10k"
    data = shards.read_shard(tmp_path / m["slides"][0]["shard"])
    rows = [sample.adata.obs_names.get_loc(b) for b in data["barcodes"]]
    cols = [sample.adata.var_names.get_loc(g) for g in m["genes"]]
    expected = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)[np.ix_(rows, cols)]
    np.testing.assert_allclose(data["expr"], expected, rtol=1e-3, atol=1e-3)


def test_resume_after_a_crash_skips_the_finished_slide(tmp_path, two_slides, monkeypatch):
    real_finish = shards.ShardWriter.finish

    def finish_then_die(self, **kw):
        if self.path.name == "mirror.h5":
            raise KeyboardInterrupt  # stands in for a kill while the second shard is being written
        return real_finish(self, **kw)

    monkeypatch.setattr(shards.ShardWriter, "finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(_samples(two_slides), tmp_path, n_top_genes=10, **SMALL)
    assert _shard_files(tmp_path) == ["crop.h5"]  # no half shard, no temporary
    assert [s["slide_id"] for s in shards.read_manifest(tmp_path)["slides"]] == ["crop"]
    done = (tmp_path / "shards" / "crop.h5").stat()
    monkeypatch.setattr(shards.ShardWriter, "finish", real_finish)
    logged = []
    m = prepare(_samples(two_slides), tmp_path, n_top_genes=10, log=logged.append, **SMALL)
    assert "crop: shard complete, skipped" in logged and "mirror: 49 spots written" in logged
    assert (tmp_path / "shards" / "crop.h5").stat().st_mtime_ns == done.st_mtime_ns
    assert [s["slide_id"] for s in m["slides"]] == ["crop", "mirror"] and _shard_files(tmp_path) == ["crop.h5",
                                                                                                      "mirror.h5"]
    # a changed source file (new sha256) is prepared again
    logged.clear()
    prepare(_samples(two_slides, ["crop"]), tmp_path, n_top_genes=10, log=logged.append, **SMALL)
    assert logged == ["crop: shard complete, skipped"]


def test_killed_run_leaves_no_half_shard_and_resumes(tmp_path, two_slides, subprocess_env):
    """SIGKILL a real `stalign prep` (2 worker processes) as soon as one shard exists, then run it again."""
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, "-m", "stalign", "prep", "--out", str(tmp_path), "--n-top-genes", "10", "--workers", "2",
           "--um-per-px", "1", "--spot-um", "64", "--niche-um", "300", "--patch-px", "160", "--quiet"]
    for name in ("crop", "mirror"):
        cmd += ["--h5ad", str(two_slides[name][0]), "--image", str(two_slides[name][1])]
    shm = Path("/dev/shm")
    before = {p.name for p in shm.glob("psm_*")} if shm.is_dir() else set()
    proc = subprocess.Popen(cmd, env=subprocess_env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "shards").glob("*.h5")):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if shm.is_dir():  # the crops' shared memory had no name left to leak (its resource tracker died too)
        assert {p.name for p in shm.glob("psm_*")} <= before
    for path in (tmp_path / "shards").glob("*.h5"):  # whatever is under a final name is complete
        assert shards.shard_attrs(path) is not None
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.h5")}
    assert finished, "no shard was finished before the kill"
    rerun = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, mtime in finished.items():
        assert f"{name[:-3]}: shard complete, skipped" in rerun.stderr
        assert (tmp_path / "shards" / name).stat().st_mtime_ns == mtime
    assert _shard_files(tmp_path) == ["mirror.h5", "test_data.h5"]  # temporaries of the killed run removed
    assert "test_data" in rerun.stdout and "mirror" in rerun.stdout


def test_two_workers_write_the_same_shards_as_one(tmp_path, two_slides):
    m1 = prepare(_samples(two_slides), tmp_path / "w1", n_top_genes=10, workers=1, **SMALL)
    m2 = prepare(_samples(two_slides), tmp_path / "w2", n_top_genes=10, workers=2, **SMALL)
    assert m1 == m2
    for entry in m1["slides"]:
        with h5py.File(tmp_path / "w1" / entry["shard"]) as a, h5py.File(tmp_path / "w2" / entry["shard"]) as b:
            assert sorted(a) == sorted(b) and dict(a.attrs).keys() == dict(b.attrs).keys()
            for key in a:
                np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=key)
    # the mirrored slide's spot patches are the mirror images of the original's
    a = shards.read_shard(tmp_path / "w1" / "shards" / "crop.h5", patches=True)
    b = shards.read_shard(tmp_path / "w1" / "shards" / "mirror.h5", patches=True)
    common = sorted(set(a["barcodes"]) & set(b["barcodes"]))
    assert len(common) > 40
    ia = [a["barcodes"].index(c) for c in common]
    ib = [b["barcodes"].index(c) for c in common]
    np.testing.assert_array_equal(b["spot_patches"][ib], a["spot_patches"][ia][:, :, ::-1])


def test_zero_spots_on_tissue_names_the_slide_and_writes_nothing(tmp_path, two_slides):
    blank = tmp_path / "blank.png"
    Image.new("RGB", (950, 1717), "white").save(blank)
    sample = read_anndata_image(two_slides["crop"][0], blank, slide_id="blank", um_per_px=1.0, crop_um=500)
    with pytest.raises(DataPrepError, match=r"slide blank \(.*blank.png\): none of its 49 spots lie on tissue"):
        prepare([sample], tmp_path / "out", **SMALL)
    assert not (tmp_path / "out" / "manifest.json").exists() and _shard_files(tmp_path / "out") == []
    # without the tissue filter the same slide is prepared
    m = prepare([sample], tmp_path / "out", tissue_filter=False, **SMALL)
    assert m["slides"][0]["n_spots"] == 49 and m["slides"][0]["n_background_dropped"] == 0


def test_a_blank_slide_after_a_good_one_with_two_workers_fails_alone(tmp_path, two_slides):
    """With two workers the second slide's tissue mask is made in the worker process while the first slide is
    written: its error still names it, and the first slide's shard is kept and equals a one-process run's."""
    blank = tmp_path / "blank.png"
    Image.new("RGB", (950, 1717), "white").save(blank)
    samples = [*_samples(two_slides, names=("crop",)),
               read_anndata_image(two_slides["crop"][0], blank, slide_id="blank", um_per_px=1.0, crop_um=500)]
    with pytest.raises(DataPrepError, match=r"slide blank \(.*blank.png\): none of its 49 spots lie on tissue"):
        prepare(samples, tmp_path / "w2", n_top_genes=10, workers=2, **SMALL)
    m2 = read_manifest(tmp_path / "w2")
    assert [e["slide_id"] for e in m2["slides"]] == ["crop"] and _shard_files(tmp_path / "w2") == ["crop.h5"]
    m1 = prepare(samples[:1], tmp_path / "w1", n_top_genes=10, workers=1, **SMALL)
    assert m1["slides"] == m2["slides"]
    with h5py.File(tmp_path / "w1" / "shards" / "crop.h5") as a, h5py.File(tmp_path / "w2" / "shards" / "crop.h5") as b:
        for key in a:
            np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=key)


def test_missing_genes_and_panel_changes_are_refused(tmp_path, two_slides):
    samples = _samples(two_slides)
    with pytest.raises(GeneNameError, match=r"crop: 'NotAGene'\n  mirror: 'NotAGene'"):
        prepare(samples, tmp_path, genes=["Gfap", "NotAGene"], **SMALL)
    assert not tmp_path.joinpath("manifest.json").exists() and _shard_files(tmp_path) == []
    m = prepare(samples[:1], tmp_path, n_top_genes=10, **SMALL)
    before = (tmp_path / "manifest.json").read_text()
    with pytest.raises(DataPrepError, match="requested gene panel .* differs from the panel of the existing shards"):
        prepare(samples, tmp_path, genes=m["genes"][::-1], **SMALL)
    with pytest.raises(DataPrepError, match="n_top_genes': 10.*n_top_genes': 20"):
        prepare(samples, tmp_path, n_top_genes=20, **SMALL)
    with pytest.raises(DataPrepError, match="patch_px=64, this run asks for 32"):
        prepare(samples, tmp_path, n_top_genes=10, **dict(SMALL, crop=CropSpec(spot_um=64.0, niche_um=500.0, patch_px=32)))
    assert (tmp_path / "manifest.json").read_text() == before and _shard_files(tmp_path) == ["crop.h5"]
    # the same panel given explicitly is accepted and the new slide is added
    m2 = prepare(samples, tmp_path, genes=m["genes"], **SMALL)
    assert [s["slide_id"] for s in m2["slides"]] == ["crop", "mirror"]


def test_cli_with_a_sample_table_prints_the_summary(tmp_path, two_slides, capsys):
    from stalign.cli import main

    table = tmp_path / "slides.csv"

    def write_table(sites):
        table.write_text("slide_id,h5ad,image,um_per_px,site\n" + "".join(
            f"{n},{two_slides[n][0]},{two_slides[n][1]},1.0,{site}\n" for n, site in zip(("crop", "mirror"), sites)))

    write_table(["hospital A", "hospital B"])
    genes = tmp_path / "genes.txt"
    genes.write_text("# panel\nMobp\nPcp4, Gfap  # astrocytes\n")
    args = ["prep", "--samples", str(table), "--out", str(tmp_path / "out"), "--genes", str(genes),
            "--spot-um", "64", "--niche-um", "300", "--patch-px", "32", "--quiet"]
    rc = main(args)
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:6] == ["slide", "spots", "off-image", "dropped", "padded", "um/px"]
    assert lines[1].split()[0] == "crop" and lines[2].split()[0] == "mirror" and "user flag" in lines[1]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["genes"] == ["Mobp", "Pcp4", "Gfap"]
    assert [e.get("site") for e in manifest["slides"]] == ["hospital A", "hospital B"]  # the samples' site column
    shard_time = (tmp_path / "out" / "shards" / "crop.h5").stat().st_mtime_ns
    write_table(["hospital C", ""])  # a new label: the manifest's, the shards are kept
    assert main(args) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e.get("site") for e in manifest["slides"]] == ["hospital C", None]
    assert (tmp_path / "out" / "shards" / "crop.h5").stat().st_mtime_ns == shard_time
    capsys.readouterr()
    rc = main(["prep", "--h5ad", str(two_slides["crop"][0]), "--out", str(tmp_path / "o2")])
    assert rc == 1 and "give one --image per --h5ad" in capsys.readouterr().err


def test_dataset_reads_the_pipeline_output(tmp_path, two_slides):
    from functools import partial

    import torch

    from stalign.data.dataset import ShardDataset, collate

    loaders = [partial(read_anndata_image, *two_slides[n], slide_id=n, um_per_px=1.0) for n in ("crop", "mirror")]
    m = prepare(loaders, tmp_path, n_top_genes=10, **SMALL)  # callables that return samples work too
    assert m["versions"]["h5py"] == h5py.__version__ and "openslide-python" in m["versions"]
    ds = ShardDataset(tmp_path, niche_spots=4)
    batch = collate([ds[0], ds[60]])
    assert batch["spot_image"].shape == (2, 3, 64, 64) and batch["niche_spot_expr"].shape == (2, 4, 10)
    assert batch["slide_idx"].tolist() == [0, 1] and batch["niche_spot_mask"][:, 0].all()
    assert torch.equal(batch["spot_expr"][0], torch.from_numpy(ds.expression_matrix()[0]))


def test_cli_reads_hest_and_spaceranger_folders(tmp_path, two_slides, fetched, capsys):
    """A HEST-1k layout built from the real crop (listed in a YAML file) and the real Space Ranger folder."""
    import shutil

    from stalign.cli import main

    hest = tmp_path / "hest"
    for sub in ("st", "wsis", "metadata"):
        (hest / sub).mkdir(parents=True)
    shutil.copy(two_slides["crop"][0], hest / "st" / "MB1.h5ad")
    shutil.copy(two_slides["crop"][1], hest / "wsis" / "MB1.jpg")
    (hest / "metadata" / "MB1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.6}))
    (tmp_path / "slides.yaml").write_text("slides:\n  - {hest: hest, id: MB1}\n")
    rc = main(["prep", "--samples", str(tmp_path / "slides.yaml"), "--out", str(tmp_path / "h"), "--n-top-genes",
               "8", "--patch-px", "32", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out.splitlines()[1].split()[:2] == ["MB1", "49"] and "HEST metadata" in out
    assert shards.read_manifest(tmp_path / "h")["slides"][0]["um_per_px"] == 0.6
    rc = main(["prep", "--spaceranger", str(fetched("squidpy-spaceranger")), "--out", str(tmp_path / "sr"),
               "--n-top-genes", "8", "--patch-px", "32", "--no-tissue-filter", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "8 genes (log1p_cp10k), 100 spots" in out and "array grid" in out


def test_two_preps_into_one_folder_at_once_keep_both_slides(tmp_path, two_slides, subprocess_env):
    """Two `stalign prep` processes, one slide each, same --out, started together: both succeed and the manifest
    lists both slides (the second waits for the folder's lock, then adds its slide)."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "stalign", "prep", "--out", str(tmp_path), "--n-top-genes", "10", "--um-per-px",
            "1", "--spot-um", "64", "--niche-um", "300", "--patch-px", "32", "--quiet"]
    procs = [subprocess.Popen(base + ["--h5ad", str(two_slides[n][0]), "--image", str(two_slides[n][1])],
                              env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in ("crop", "mirror")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    manifest = shards.read_manifest(tmp_path)
    assert sorted(s["slide_id"] for s in manifest["slides"]) == ["mirror", "test_data"]
    assert _shard_files(tmp_path) == ["mirror.h5", "test_data.h5"]


def test_a_held_lock_makes_prep_wait_then_give_up_with_a_message(tmp_path, two_slides):
    from filelock import FileLock

    from stalign.data.pipeline import LOCK_NAME

    (tmp_path / "out").mkdir()
    with FileLock(str(tmp_path / "out" / LOCK_NAME)):
        with pytest.raises(DataPrepError, match="another stalign prep is still writing here after 0.2 s"):
            prepare(_samples(two_slides, ("crop",)), tmp_path / "out", n_top_genes=5, lock_timeout=0.2, **SMALL)
    assert not (tmp_path / "out" / "manifest.json").exists()
    prepare(_samples(two_slides, ("crop",)), tmp_path / "out", n_top_genes=5, lock_timeout=0.2, **SMALL)
    # a failed first run leaves no folder behind
    with pytest.raises(DataPrepError):
        prepare([], tmp_path / "new", **SMALL)
    assert not (tmp_path / "new").exists()


def test_prep_flags_for_real_folders_make_unique_genes_and_upsampling(tmp_path, squidpy_crop, fetched, capsys):
    """--make-unique-genes (the flag the duplicate-gene error names) works; a lowres-only Visium folder warns once
    that its crops are upsampled, naming the factor; --tissue-from in_tissue keeps every Space Ranger spot."""
    import warnings

    import anndata as ad

    from stalign.cli import main

    a = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    a.var_names = [a.var_names[0]] + list(a.var_names[:-1])  # the first gene name twice
    a.write_h5ad(tmp_path / "dup.h5ad")
    args = ["prep", "--h5ad", str(tmp_path / "dup.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
            "--n-top-genes", "5", "--patch-px", "32", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    assert "--make-unique-genes" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--make-unique-genes"]) == 0
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["prep", "--spaceranger", str(fetched("squidpy-spaceranger")), "--out", str(tmp_path / "sr"),
                     "--tissue-from", "in_tissue", "--n-top-genes", "5", "--patch-px", "64", "--quiet"]) == 0
    ups = [str(w.message) for w in seen if "upsampled" in str(w.message)]
    assert len(ups) == 1 and "upsampled 9.2x" in ups[0], ups  # 64 px from 112 µm / 16.11 µm/px (array grid)
    assert shards.read_manifest(tmp_path / "sr")["slides"][0]["n_spots"] == 100
