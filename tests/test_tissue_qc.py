"""Which spots prep keeps: Space Ranger's in_tissue call by default, the image mask on pale tissue, the reasons for
dropped spots, and the QC picture."""
from __future__ import annotations

import csv
import json

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from stalign.data.crop_spec import CropSpec
from stalign.data.errors import DataPrepError
from stalign.data.pipeline import prepare
from stalign.data.prep_qc import BAND_PX, DROPPED_COLOUR, KEPT_COLOUR
from stalign.data.readers import read_anndata_image
from stalign.data.tissue import tissue_fraction, tissue_mask
from stalign.data.tissue_call import call_tissue, offer_in_tissue, tissue_rule

UM_PER_PX = 5.0  # spots every 20 px = 100 µm; the 112 µm spot crop is 22.4 px wide
CROP = CropSpec(patch_px=16)
DENSE, PALE = (slice(40, 200), slice(30, 170)), (slice(40, 200), slice(210, 370))  # (rows, columns)


def _slide(path):
    """A 400x300 slide: glass (243 grey, noise), a dense pink region on the left and a pale region on the right
    (RGB ~(228, 214, 224): saturation 0.06, 5-12 % darker than the glass) with 1 % purple nuclei specks."""
    rng = np.random.default_rng(0)
    img = rng.normal(243, 2.0, (300, 400, 3))
    img[DENSE] = rng.normal((200, 110, 170), 12, (160, 140, 3))
    pale = rng.normal((228, 214, 224), 3, (160, 160, 3))
    pale[rng.random((160, 160)) < 0.01] = (120, 80, 160)
    img[PALE] = pale
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return path


def _grid():
    xs, ys = np.meshgrid(np.arange(20, 400, 20.0), np.arange(20, 300, 20.0))
    return np.stack([xs.ravel(), ys.ravel()], 1)


def _inside(xy, region, margin):
    rows, cols = region
    return (xy[:, 0] >= cols.start + margin) & (xy[:, 0] <= cols.stop - margin) \
        & (xy[:, 1] >= rows.start + margin) & (xy[:, 1] <= rows.stop - margin)


def _sample(tmp_path, obs=None):
    xy = _grid()
    a = ad.AnnData(np.random.default_rng(1).poisson(3, (len(xy), 12)).astype(np.float32))
    a.obs_names = [f"s{i}" for i in range(len(xy))]
    a.var_names = [f"g{i}" for i in range(12)]
    a.obsm["spatial"] = xy
    for key, values in (obs or {}).items():
        a.obs[key] = values
    return read_anndata_image(a, _slide(tmp_path / "pale.png"), slide_id="pale", um_per_px=UM_PER_PX)


def test_image_mask_keeps_pale_tissue_and_drops_glass_with_reasons(tmp_path):
    sample = _sample(tmp_path)
    xy = sample.coords_px
    dense, pale = _inside(xy, DENSE, 12), _inside(xy, PALE, 12)
    glass = ~_inside(xy, DENSE, -20) & ~_inside(xy, PALE, -20)  # crops at least 8 px clear of any tissue
    assert dense.sum() >= 20 and pale.sum() >= 20 and glass.sum() >= 40
    # the saturation-only mask (faint=False) misses the pale region: the fixture tests what it should
    thumb = np.asarray(Image.open(sample.image_path).convert("RGB"))
    assert (tissue_fraction(tissue_mask(thumb, faint=False), xy, radius=11)[pale] < 0.5).all()

    call = call_tissue(str(sample.image_path), UM_PER_PX, xy, tissue_rule(sample), window_um=CROP.spot_um)
    assert call.rule.rule == "image" and "no Space Ranger in_tissue call" in call.rule.why
    assert call.keep[dense].all() and call.keep[pale].all() and not call.keep[glass].any()
    assert call.mask_info.glass is not None and max(abs(c - 243) for c in call.mask_info.glass.rgb) <= 2
    assert set(call.reasons[glass]) == {"no tissue in the 112 µm spot crop"}
    assert (call.reasons[call.keep] == "").all()
    edge = ~call.keep & (call.fraction > 0)  # dropped at the tissue edge: the fraction is below the threshold
    assert (call.fraction[edge] < 0.5).all()
    assert set(call.reasons[edge]) <= {"tissue fraction < 0.5 in the 112 µm spot crop"}
    text = call.describe()
    assert f"kept {int(call.keep.sum())} of {len(xy)}" in text and "no tissue in the 112 µm spot crop" in text


def _near(rgb, colour, tol=40):
    return int(np.abs(np.asarray(rgb[:3], dtype=int) - np.asarray(colour)).max()) <= tol


def test_prep_writes_qc_picture_dropped_table_and_manifest_reasons(tmp_path, capsys):
    sample = _sample(tmp_path)
    logs = []
    m = prepare([sample], tmp_path / "out", crop=CROP, n_top_genes=5, progress=False, log=logs.append)
    entry = m["slides"][0]
    tissue = entry["tissue"]
    assert tissue["rule"] == "image" and tissue["qc_picture"] == "qc/pale.png"
    n_dropped = entry["n_input_spots"] - entry["n_spots"]
    assert n_dropped > 40 and tissue["n_dropped"] == n_dropped == sum(tissue["dropped_by_reason"].values())
    assert tissue["min_tissue_fraction"] == 0.5 and tissue["spot_crop_um"] == 112.0
    assert tissue["mask"]["faint_od_threshold"] >= 0.02
    assert any("tissue rule the image tissue mask" in line and str(tmp_path / "out" / "qc" / "pale.png") in line
               for line in logs), logs
    # the dropped-spot table names every dropped barcode with its fraction and reason
    with open(tmp_path / "out" / tissue["dropped_spots"]) as fh:
        rows = list(csv.DictReader(fh))
    kept = set(_shard_barcodes(tmp_path / "out" / entry["shard"]))
    assert len(rows) == n_dropped and not kept & {r["barcode"] for r in rows}
    assert all(float(r["tissue_fraction"]) < 0.5 and "spot crop" in r["reason"] for r in rows)
    # the picture: a PNG whose pixels at a kept and at a dropped spot show the two colours
    png = tmp_path / "out" / "qc" / "pale.png"
    with Image.open(png) as im:
        im.verify()
    pic = np.asarray(Image.open(png).convert("RGB"))
    scale = pic.shape[1] / entry["image_size"][0]
    assert pic.shape[0] == round(entry["image_size"][1] * scale) + BAND_PX

    def at(x, y):
        return pic[round(BAND_PX + y * scale), round(x * scale)]

    drop = next(r for r in rows if r["reason"].startswith("no tissue"))
    assert _near(at(float(drop["x_px"]), float(drop["y_px"])), DROPPED_COLOUR)
    assert _near(at(100.0, 120.0), KEPT_COLOUR)  # a spot in the dense region
    assert _near(at(300.0, 120.0), KEPT_COLOUR)  # a spot in the pale region
    assert not _near(at(110.0, 130.0), KEPT_COLOUR) and not _near(at(110.0, 130.0), DROPPED_COLOUR)  # between
    # a re-run with another rule is not skipped: the rule is part of what a finished shard was made with
    m2 = prepare([sample], tmp_path / "out", crop=CROP, n_top_genes=5, progress=False, tissue_filter=False)
    assert m2["slides"][0]["tissue"]["rule"] == "none" and m2["slides"][0]["n_spots"] == len(sample.coords_px)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["slides"][0]["tissue"]["dropped_spots"] is None


def _shard_barcodes(path):
    import h5py

    with h5py.File(path) as f:
        return [b.decode() if isinstance(b, bytes) else str(b) for b in f["barcodes"][:]]


def test_in_tissue_call_is_trusted_where_the_reader_has_it(tmp_path):
    n = len(_grid())
    call = np.ones(n, dtype=int)
    call[:3] = 0
    sample = _sample(tmp_path, obs={"in_tissue": call})
    # a plain AnnData + image: its obs column is not Space Ranger's call unless the reader says so
    assert tissue_rule(sample, "auto").rule == "image"
    with pytest.raises(DataPrepError, match=r"slide pale .*--tissue-from in_tissue needs Space Ranger's"):
        tissue_rule(sample, "in_tissue")
    offer_in_tissue(sample)  # what prep does for HEST samples with obs['in_tissue']
    rule = tissue_rule(sample, "auto")
    assert rule.rule == "in_tissue" and rule.in_tissue.sum() == n - 3
    assert tissue_rule(sample, "image").rule == "image"
    assert tissue_rule(sample, "auto", tissue_filter=False).rule == "none"
    got = call_tissue(str(sample.image_path), UM_PER_PX, sample.coords_px, rule, window_um=112)
    assert got.keep.tolist() == (call == 1).tolist()
    assert got.dropped_by_reason() == {"in_tissue=0 in Space Ranger's call": 3}
    assert got.mask_would_drop() > 0 and "the image mask would also have dropped" in got.describe()
    sample.adata.obs["in_tissue"] = ["yes"] * (n - 1) + ["maybe"]
    with pytest.raises(DataPrepError, match=r"obs\['in_tissue'\] must be 0/1 or true/false, got 'maybe' for spot"):
        tissue_rule(sample, "auto")


def test_prep_default_keeps_every_in_tissue_spaceranger_spot(tmp_path, fetched, capsys):
    """The Space Ranger folder whose 100 spots are all in_tissue=1 (31 of them on pale tissue): the default keeps
    all 100 and says which rule it used; the image mask, asked for, now keeps them too."""
    import warnings

    from stalign.cli import main

    folder = str(fetched("squidpy-spaceranger"))
    args = ["prep", "--spaceranger", folder, "--n-top-genes", "5", "--patch-px", "16", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args, "--out", str(tmp_path / "auto")]) == 0
        err = capsys.readouterr().err
        assert main([*args, "--out", str(tmp_path / "image"), "--tissue-from", "image"]) == 0
    entry = json.loads((tmp_path / "auto" / "manifest.json").read_text())["slides"][0]
    assert entry["n_spots"] == 100 and entry["tissue"]["rule"] == "in_tissue"
    assert "tissue rule Space Ranger's in_tissue (--tissue-from auto: the slide has Space Ranger's call)" in err
    assert f"QC picture {tmp_path / 'auto' / 'qc' / 'squidpy-spaceranger.png'}" in err
    assert (tmp_path / "auto" / "qc" / "squidpy-spaceranger.png").stat().st_size > 1000
    image = json.loads((tmp_path / "image" / "manifest.json").read_text())["slides"][0]
    assert image["tissue"]["rule"] == "image" and image["n_spots"] == 100


def test_prep_hest_sample_with_in_tissue_uses_it_and_lists_the_dropped(tmp_path, capsys):
    """A HEST sample whose obs carries in_tissue: `stalign prep --hest` keeps the in_tissue=1 spots (the default
    rule) and lists the others with their reason; --tissue-from image uses the mask instead."""
    from stalign.cli import main

    root = tmp_path / "hest"
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True)
    _slide(root / "wsis" / "S1.png")
    xy = _grid()
    call = np.ones(len(xy), dtype=np.int64)
    call[[0, 5, 7]] = 0
    a = ad.AnnData(np.random.default_rng(2).poisson(3, (len(xy), 12)).astype(np.float32))
    a.obs_names = [f"b{i}" for i in range(len(xy))]
    a.var_names = [f"g{i}" for i in range(12)]
    a.obs["in_tissue"] = call
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / "S1.h5ad")
    (root / "metadata" / "S1.json").write_text(json.dumps({"pixel_size_um_estimated": UM_PER_PX}))
    args = ["prep", "--hest", str(root), "--n-top-genes", "5", "--patch-px", "16", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert "S1: tissue rule Space Ranger's in_tissue (--tissue-from auto" in capsys.readouterr().err
    entry = json.loads((tmp_path / "auto" / "manifest.json").read_text())["slides"][0]
    assert entry["n_spots"] == len(xy) - 3 and entry["tissue"]["rule"] == "in_tissue"
    with open(tmp_path / "auto" / entry["tissue"]["dropped_spots"]) as fh:
        rows = list(csv.DictReader(fh))
    assert [r["barcode"] for r in rows] == ["b0", "b5", "b7"]
    assert {r["reason"] for r in rows} == {"in_tissue=0 in Space Ranger's call"}
    assert main([*args, "--out", str(tmp_path / "image"), "--tissue-from", "image"]) == 0
    image = json.loads((tmp_path / "image" / "manifest.json").read_text())["slides"][0]
    assert image["tissue"]["rule"] == "image" and image["n_spots"] < len(xy) - 40
