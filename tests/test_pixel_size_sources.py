"""Pixel size from every source on folders of known geometry (true 0.5 µm/px): Space Ranger folders written as 10x
writes them, AnnData + image, and HEST-layout samples of Visium, legacy ST, Visium HD and Xenium pseudo-spots."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stalign.data.errors import PixelSizeError
from stalign.data.pixel_size import PixelSizeWarning, fit_array_grid, knn_pitch_candidate
from stalign.data.readers import read_anndata_image, read_hest, read_spaceranger
from stalign.data.slide import write_pyramidal_tiff

TRUE_UM_PER_PX = 0.5
SOURCES_OK = 0.02  # every source within 2% of the truth


def _visium_grid(n_rows: int, n_cols: int, *, angle_deg: float = 4.0, offset=(150.0, 170.0)):
    """Visium array indices (even rows even columns) and their full-res px at TRUE_UM_PER_PX, rotated."""
    rows, cols = zip(*[(r, c) for r in range(n_rows) for c in range(r % 2, 2 * n_cols, 2)])
    rows, cols = np.array(rows), np.array(cols)
    um = np.column_stack([cols * 50.0, rows * 50.0 * math.sqrt(3)])  # 100 µm along a row, rows 86.6 µm apart
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return rows, cols, um @ rot.T / TRUE_UM_PER_PX + np.array(offset)


def _texture(width: int, height: int) -> np.ndarray:
    return np.random.default_rng(0).integers(90, 200, (height, width, 3), dtype=np.uint8)


def _write_10x_h5(path: Path, barcodes: list[str], n_genes: int = 4) -> None:
    """A v3 ``filtered_feature_bc_matrix.h5`` (CSC, features x barcodes) with small counts."""
    counts = np.random.default_rng(1).integers(0, 5, (n_genes, len(barcodes)))
    counts[0] += 1  # no empty spot
    nz = [np.flatnonzero(counts[:, j]) for j in range(len(barcodes))]
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m["data"] = np.concatenate([counts[i, j] for j, i in enumerate(nz)]).astype(np.int32)
        m["indices"] = np.concatenate(nz).astype(np.int64)
        m["indptr"] = np.cumsum([0] + [len(i) for i in nz]).astype(np.int64)
        m["shape"] = np.array([n_genes, len(barcodes)], dtype=np.int32)
        m["barcodes"] = np.array([b.encode() for b in barcodes])
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(n_genes)])
        feats["name"] = np.array([f"GENE{i}".encode() for i in range(n_genes)])
        feats["feature_type"] = np.array([b"Gene Expression"] * n_genes)


def _spaceranger(tmp_path: Path, *, keep_every: int = 1, diameter_um: float = 65.0, hires_scalef: float = 0.1):
    """A Space Ranger ``outs`` folder: 6 x 6 Visium positions (the outer ring off tissue), a matrix of the in-tissue
    spots (every ``keep_every``-th), scale factors whose ``spot_diameter_fullres`` spans ``diameter_um``, a hires
    PNG and a full-res pyramidal TIFF with 0.5 µm/px in its tags."""
    outs, spatial = tmp_path / "outs", tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    rows, cols, xy = _visium_grid(6, 6)
    barcodes = [f"{''.join('ACGT'[(i >> (2 * k)) & 3] for k in range(8))}-1" for i in range(len(rows))]
    in_tissue = (rows > 0) & (rows < 5) & (cols > 1) & (cols < 10)
    pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(int), "array_row": rows, "array_col": cols,
                  "pxl_row_in_fullres": xy[:, 1].round().astype(int), "pxl_col_in_fullres": xy[:, 0].round().astype(int)}
                 ).to_csv(spatial / "tissue_positions.csv", index=False)
    _write_10x_h5(outs / "filtered_feature_bc_matrix.h5", [b for b, t in zip(barcodes, in_tissue) if t][::keep_every])
    (spatial / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": diameter_um / TRUE_UM_PER_PX, "fiducial_diameter_fullres": 100 / TRUE_UM_PER_PX,
        "tissue_hires_scalef": hires_scalef, "tissue_lowres_scalef": hires_scalef / 4}))
    size = (int(xy[:, 0].max()) + 200, int(xy[:, 1].max()) + 200)
    full = _texture(*size)
    Image.fromarray(full).resize((round(size[0] * hires_scalef), round(size[1] * hires_scalef))).save(
        spatial / "tissue_hires_image.png")
    return outs, write_pyramidal_tiff(tmp_path / "fullres.tif", full, um_per_px=TRUE_UM_PER_PX, levels=1)


def _all_close(sources: dict[str, float], truth: float) -> None:
    assert sources and all(v == pytest.approx(truth, rel=SOURCES_OK) for v in sources.values()), sources


def test_spaceranger_grid_diameter_and_metadata_agree(tmp_path):
    outs, tif = _spaceranger(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeWarning)  # nothing disagrees
        full = read_spaceranger(outs, image=tif)
        hires = read_spaceranger(outs)
    assert set(full.pixel_size_sources) == {"grid", "metadata", "spot-diameter", "pitch"}
    _all_close(full.pixel_size_sources, TRUE_UM_PER_PX)
    assert full.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=0.005)  # the grid fit, rotated 4°
    assert full.pixel_size_source.startswith("array grid (100 µm hex pitch = ")
    assert "fit on 36 positions" in full.pixel_size_source  # all positions, the 16 off tissue too
    # the hires PNG: the same sources (but the PNG's own dpi) at 1 / tissue_hires_scalef
    assert set(hires.pixel_size_sources) == {"grid", "spot-diameter", "pitch"}
    _all_close(hires.pixel_size_sources, TRUE_UM_PER_PX / 0.1)
    for source in ("grid", "metadata", "spot-diameter", "pitch"):
        one = read_spaceranger(outs, image=tif, pixel_size_from=source)
        assert one.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=SOURCES_OK), (source, one.pixel_size_source)


def test_subset_matrix_still_gives_the_full_grid_spacing(tmp_path):
    outs, tif = _spaceranger(tmp_path, keep_every=3)
    sample = read_spaceranger(outs, image=tif)
    assert sample.n_spots == 6  # 16 in-tissue spots, every third kept
    assert sample.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=0.005) and "array grid" in sample.pixel_size_source
    pitch = read_spaceranger(outs, image=tif, pixel_size_from="pitch")  # the grid fit, not the kept spots' spacing
    assert pitch.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=0.005) and "array grid" in pitch.pixel_size_source
    # without array indices the kNN pitch can only measure the spots it is given, and says so
    value, source = knn_pitch_candidate(sample.coords_px, 100.0)()
    assert value < 0.75 * TRUE_UM_PER_PX and "of the 6 spots given; a subset of the spots reads wider" in source


def test_sources_that_disagree_by_more_than_5_percent_warn_naming_both(tmp_path):
    outs, tif = _spaceranger(tmp_path, diameter_um=72.0)  # 144 px: read as 65 µm, 0.4514 µm/px
    with pytest.warns(PixelSizeWarning, match=r"disagree by 11%: grid 0\.500\d µm/px \(used\) vs spot-diameter "
                                              r"0\.4514 µm/px \(also metadata 0\.5"):
        sample = read_spaceranger(outs, image=tif)
    assert sample.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=0.005)
    assert sample.pixel_size_sources["spot-diameter"] == pytest.approx(65 / 144)
    # a user flag is compared too
    with pytest.warns(PixelSizeWarning, match=r"user flag 0\.6 µm/px \(used\) vs"):
        assert read_spaceranger(outs, image=tif, um_per_px=0.6).pixel_size_sources["user flag"] == 0.6


def test_anndata_with_array_indices_uses_the_grid(tmp_path):
    rows, cols, xy = _visium_grid(5, 5, angle_deg=-90)
    xy = xy - xy.min(axis=0) + 150
    keep = np.arange(len(rows))[::2]  # a subset of the spots
    adata = ad.AnnData(X=np.ones((len(keep), 3), dtype=np.float32),
                       obs=pd.DataFrame({"array_row": rows[keep], "array_col": cols[keep]},
                                        index=[f"s{i}" for i in keep]))
    adata.obsm["spatial"] = xy[keep]
    Image.fromarray(_texture(1200, 1200)).save(tmp_path / "he.png")
    sample = read_anndata_image(adata, tmp_path / "he.png")
    assert sample.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=0.005) and "array grid" in sample.pixel_size_source
    assert sample.n_spots == len(keep)
    # a square grid (legacy ST-like indices) is not Visium's hex geometry: the grid source refuses it
    sq_rows, sq_cols, sq_xy = _square(4, 100.0)
    square = ad.AnnData(X=np.ones((len(sq_rows), 3), dtype=np.float32),
                        obs=pd.DataFrame({"array_row": sq_rows, "array_col": sq_cols},
                                         index=[f"q{i}" for i in range(len(sq_rows))]))
    square.obsm["spatial"] = sq_xy
    with pytest.raises(PixelSizeError, match=r"grid: .*not hex-packed with a 100 µm pitch"):
        read_anndata_image(square, tmp_path / "he.png", pixel_size_from="grid")


def test_grid_fit_is_rotation_flip_and_outlier_robust():
    rows, cols, xy = _visium_grid(8, 8, angle_deg=33)
    for pts in (xy, xy * np.array([-1, 1])):  # a mirrored image too
        assert fit_array_grid(rows, cols, pts)[0] == pytest.approx(TRUE_UM_PER_PX, rel=1e-3)
    bad = xy.copy()
    bad[5] += 300  # one position far off its grid place is left out
    value, source = fit_array_grid(rows, cols, bad)
    assert value == pytest.approx(TRUE_UM_PER_PX, rel=1e-3) and "1 off the grid left out" in source
    with pytest.raises(PixelSizeError, match="fewer than 3 spot positions off one line"):
        fit_array_grid(rows[rows == 0], cols[rows == 0], xy[rows == 0])


# ------------------------------------------------------------------------------------------- HEST-layout samples
def _square(n: int, pitch_um: float, offset: float = 200.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows, cols = (a.ravel() for a in np.mgrid[0:n, 0:n])
    return rows, cols, np.column_stack([cols, rows]) * pitch_um / TRUE_UM_PER_PX + offset


def _hest_sample(root: Path, sample_id: str, tech: str) -> None:
    """One sample as HEST's readers write it (``register_downscale_img``: ``spot_diameter_fullres`` = the
    registration spot size / pixel size; Visium and Xenium registered with HEST's default 55 µm)."""
    if tech == "Visium":
        rows, cols, xy = _visium_grid(5, 5)
        meta, registered = {"spot_diameter": 55.0, "inter_spot_dist": 100.0}, 55.0
    elif tech == "Spatial Transcriptomics":
        rows, cols, xy = _square(4, 200.0)
        meta, registered = {"spot_diameter": 100.0, "inter_spot_dist": 200.0}, 100.0
    elif tech == "Visium HD":
        rows, cols, xy = _square(12, 16.0)
        meta, registered = {"spot_diameter": 16.0, "inter_spot_dist": 16.0}, 16.0
    else:  # Xenium pseudo-spots: transcripts pooled in 100 µm squares
        rows, cols, xy = _square(4, 100.0)
        meta, registered = {"spot_diameter": 100.0, "inter_spot_dist": 100.0}, 55.0
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    adata = ad.AnnData(X=np.ones((len(rows), 3), dtype=np.float32),
                       obs=pd.DataFrame({"array_row": rows, "array_col": cols},
                                        index=[f"{sample_id}_{i}" for i in range(len(rows))]))
    adata.obsm["spatial"] = xy
    adata.uns["spatial"] = {"ST": {"scalefactors": {"spot_diameter_fullres": registered / TRUE_UM_PER_PX,
                                                    "tissue_downscaled_fullres_scalef": 0.1}}}
    adata.write_h5ad(root / "st" / f"{sample_id}.h5ad")
    write_pyramidal_tiff(root / "wsis" / f"{sample_id}.tif",
                         _texture(int(xy[:, 0].max()) + 200, int(xy[:, 1].max()) + 200),
                         um_per_px=TRUE_UM_PER_PX, levels=1)
    (root / "metadata" / f"{sample_id}.json").write_text(json.dumps(
        {"st_technology": tech, "pixel_size_um_estimated": TRUE_UM_PER_PX, "pixel_size_um_embedded": TRUE_UM_PER_PX,
         **meta}))


@pytest.mark.parametrize("tech, with_grid", [("Visium", True), ("Spatial Transcriptomics", True),
                                             ("Visium HD", False), ("Xenium", False)])
def test_hest_every_source_is_right_per_technology(tmp_path, tech, with_grid):
    _hest_sample(tmp_path, "S0", tech)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PixelSizeWarning)
        sample = read_hest(tmp_path, "S0")
    expected = {"hest-estimated", "hest-embedded", "metadata", "spot-diameter", "pitch"} | ({"grid"} if with_grid
                                                                                             else set())
    assert set(sample.pixel_size_sources) == expected
    _all_close(sample.pixel_size_sources, TRUE_UM_PER_PX)
    for source in expected:
        one = read_hest(tmp_path, "S0", pixel_size_from=source)
        assert one.um_per_px == pytest.approx(TRUE_UM_PER_PX, rel=SOURCES_OK), (tech, source, one.pixel_size_source)


def test_hest_geometry_from_the_caller_wins_and_wrong_geometry_warns(tmp_path):
    _hest_sample(tmp_path, "ST0", "Spatial Transcriptomics")
    # legacy ST read with Visium's 55 / 100 µm (the old rule): 0.275 and 0.25 µm/px, warned against the metadata
    with pytest.warns(PixelSizeWarning, match=r"hest-estimated 0\.5 µm/px \(used\) vs grid 0\.25 µm/px "
                                              r"\(also .*spot-diameter 0\.275, pitch 0\.25\)"):
        wrong = read_hest(tmp_path, "ST0", spot_diameter_um=55, spot_pitch_um=100)
    assert wrong.pixel_size_sources["spot-diameter"] == pytest.approx(0.275)
    assert "spot_diameter_um given" in read_hest(tmp_path, "ST0", pixel_size_from="spot-diameter",
                                                 spot_diameter_um=100).pixel_size_source


def test_prep_records_every_source_in_the_manifest_and_takes_the_geometry_flags(tmp_path, capsys):
    from stalign.cli import main

    outs, _ = _spaceranger(tmp_path)
    args = ["prep", "--spaceranger", str(outs), "--n-top-genes", "3", "--patch-px", "16", "--no-tissue-filter",
            "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hires PNG upsampled
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
    entry = json.loads((tmp_path / "a" / "manifest.json").read_text())["slides"][0]
    assert set(entry["pixel_size_sources"]) == {"grid", "spot-diameter", "pitch"}
    _all_close(entry["pixel_size_sources"], TRUE_UM_PER_PX / 0.1)
    assert entry["um_per_px"] == entry["pixel_size_sources"]["grid"] and "array grid" in capsys.readouterr().out
    # the geometry flags reach the readers (a grid read as 200 µm: twice the µm/px)
    from stalign.cli import build_parser
    from stalign.commands.prep import _loaders
    from stalign.data.crop_spec import CropSpec

    parsed = build_parser().parse_args([*args, "--out", str(tmp_path / "b"), "--spot-pitch-um", "200",
                                        "--spot-diameter-um", "130", "--pixel-size-from", "grid"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = _loaders(parsed, CropSpec())[0]()
    assert sample.um_per_px == pytest.approx(2 * TRUE_UM_PER_PX / 0.1, rel=0.005)
    assert sample.pixel_size_sources["spot-diameter"] == pytest.approx(2 * TRUE_UM_PER_PX / 0.1)
    assert main([*args, "--out", str(tmp_path / "c"), "--spot-diameter-um", "0"]) == 1
    assert "--spot-diameter-um must be a number > 0, got 0.0" in capsys.readouterr().err
