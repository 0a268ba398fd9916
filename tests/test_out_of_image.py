"""Spots outside the image (HEST's patching drops them with a warning): on a HEST-layout sample with a few spots
beyond the slide's edge, prep keeps the rest, warns naming the count and barcodes and records them in the
manifest; a sample whose spots are all (or mostly) outside is refused with one line."""
from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pytest

from stalign.cli import main
from stalign.data.errors import CoordinateError
from stalign.data.readers import read_hest
from stalign.data.sample import MIN_SPOTS_ON_IMAGE
from stalign.data.slide import write_pyramidal_tiff

W, H, UM_PER_PX, NICHE_UM = 320, 240, 1.0, 60.0  # margin: half a niche crop = 30 px
OUT_X = (W + 100.0, -80.0, W / 2)  # three spots beyond the edges (the last also beyond the bottom)


def _hest_sample(root, sid: str, xy: np.ndarray) -> None:
    """A HEST-1k sample as HEST writes it: st/<id>.h5ad (obsm['spatial'] in level-0 px), wsis/<id>.tif,
    metadata/<id>.json (pixel_size_um_estimated)."""
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    image = (rng.random((H, W, 3)) * 80 + np.array([170, 90, 150])).astype(np.uint8)  # pink, textured
    write_pyramidal_tiff(root / "wsis" / f"{sid}.tif", image, um_per_px=UM_PER_PX, tile=64)
    counts = rng.poisson(3.0, (len(xy), 12)).astype(np.float32)
    adata = ad.AnnData(counts, obs={"in_tissue": np.ones(len(xy), int)}, var={"n": np.arange(12)})
    adata.obs_names = [f"spot{i:02d}-1" for i in range(len(xy))]
    adata.var_names = [f"GENE{j}" for j in range(12)]
    adata.obsm["spatial"] = xy
    adata.write_h5ad(root / "st" / f"{sid}.h5ad")
    (root / "metadata" / f"{sid}.json").write_text(json.dumps({"pixel_size_um_estimated": UM_PER_PX}))


def _grid() -> np.ndarray:
    gx, gy = np.meshgrid(np.linspace(20, W - 20, 6), np.linspace(20, H - 20, 5))
    return np.stack([gx.ravel(), gy.ravel()], 1)  # 30 spots on the image


def _prep(root, out, sid: str) -> int:
    return main(["prep", "--hest", str(root), "--ids", sid, "--out", str(out), "--no-tissue-filter", "--quiet",
                 "--n-top-genes", "8", "--spot-um", "30", "--niche-um", str(NICHE_UM), "--patch-px", "16"])


def test_out_of_image_spots_are_dropped_warned_about_and_recorded(tmp_path, capsys):
    inside = _grid()
    outside = np.array([[OUT_X[0], 50.0], [OUT_X[1], 100.0], [OUT_X[2], H + 90.0]])
    xy = np.concatenate([inside[:10], outside, inside[10:]])  # the dropped spots sit between kept ones
    _hest_sample(tmp_path / "hest", "OUT0", xy)
    dropped = ["spot10-1", "spot11-1", "spot12-1"]
    with pytest.warns(UserWarning, match=r"OUT0\.h5ad obsm\['spatial'\]: dropped 3 of 33 spots that lie outside .*OUT0\.tif "
                                         r"\(320x240 px, margin 30 px.*'spot10-1', 'spot11-1', 'spot12-1'") as rec:
        assert _prep(tmp_path / "hest", tmp_path / "shards", "OUT0") == 0
    assert sum("dropped" in str(w.message) for w in rec) == 1
    table = capsys.readouterr().out.splitlines()
    assert "off-image" in table[0] and next(r for r in table if r.startswith("OUT0")).split()[1:3] == ["30", "3"]
    entry = json.loads((tmp_path / "shards" / "manifest.json").read_text())["slides"][0]
    assert entry["dropped_out_of_image"] == {"count": 3, "barcodes": dropped}
    assert entry["n_spots"] == entry["n_input_spots"] == 30
    # the kept spots keep their own expression rows and coordinates
    sample = read_hest(tmp_path / "hest", "OUT0", crop_um=NICHE_UM)
    raw = ad.read_h5ad(tmp_path / "hest" / "st" / "OUT0.h5ad")
    keep = ~raw.obs_names.isin(dropped)
    assert list(sample.adata.obs_names) == list(raw.obs_names[keep])
    np.testing.assert_array_equal(sample.adata.X, raw.X[keep])
    np.testing.assert_array_equal(sample.coords_px, xy[keep])


def test_a_slide_mostly_or_all_outside_is_refused_in_one_line(tmp_path, capsys):
    _hest_sample(tmp_path / "hest", "ALL", _grid() * 4 + 2 * W)  # every spot: a wrong image or scale
    assert _prep(tmp_path / "hest", tmp_path / "shards", "ALL") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ALL.h5ad obsm['spatial']: all 30 spots lie outside" in err
    assert "different image or scale" in err and not (tmp_path / "shards" / "manifest.json").exists()
    # more than half outside (16 of 30, 14 would remain < 50%): refused, naming the threshold
    xy = _grid()
    xy[:16, 0] += 2 * W
    _hest_sample(tmp_path / "hest2", "HALF", xy)
    with pytest.raises(CoordinateError, match=r"16 of 30 spots lie outside.*fewer than 50% would remain"):
        read_hest(tmp_path / "hest2", "HALF", crop_um=NICHE_UM)
    assert MIN_SPOTS_ON_IMAGE == 0.5
    xy[15, 0] -= 2 * W  # 15 of 30 outside: exactly half remain, kept
    _hest_sample(tmp_path / "hest3", "HALF", xy)
    with pytest.warns(UserWarning, match="dropped 15 of 30"):
        assert read_hest(tmp_path / "hest3", "HALF", crop_um=NICHE_UM).n_spots == 15
