"""Visium HD reader on folders laid out as Space Ranger writes them (``outs/binned_outputs/square_XXXum``), with a
known geometry: 0.25 µm per full-res px, the bin grid turned 3°, a tissue disc, hires/lowres PNGs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stalign.data.errors import BarcodeError, CoordinateError
from stalign.data.pixel_size import PixelSizeWarning
from stalign.data.slide import write_pyramidal_tiff
from stalign.data.visium_hd import find_bins, read_visium_hd
from stofm.util.errors import InputError

MPP = 0.25  # µm per full-res px
HIRES, LOWRES = 0.2, 0.05
SIZE = (1200, 1000)  # full-res width, height
ORIGIN = np.array([150.0, 100.0])  # full-res px of the grid's corner
ANGLE = np.deg2rad(3.0)
EXTENT_UM = 192.0
TISSUE = (ORIGIN + 384.0, 300.0)  # disc centre (px) and radius (px) in full-res


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str]) -> None:
    """A v3 ``filtered_feature_bc_matrix.h5`` (features x barcodes CSC, as Space Ranger writes it)."""
    import h5py
    from scipy import sparse

    csc = sparse.csc_matrix(counts.T.astype(np.int32))
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        for key, value in (("data", csc.data), ("indices", csc.indices.astype(np.int64)),
                           ("indptr", csc.indptr.astype(np.int64)), ("shape", np.array(csc.shape, np.int32)),
                           ("barcodes", np.array([b.encode() for b in barcodes]))):
            m[key] = value
        feats = m.create_group("features")
        feats["id"] = np.array([f"ENSG{i:05d}".encode() for i in range(len(genes))])
        feats["name"] = np.array([g.encode() for g in genes])
        feats["feature_type"] = np.array([b"Gene Expression"] * len(genes))
        feats["genome"] = np.array([b"GRCh38"] * len(genes))


def bin_centres(bin_um: int) -> tuple[np.ndarray, np.ndarray]:
    """(array_row, array_col) and full-res (x, y) of every bin of the grid."""
    n = int(EXTENT_UM / bin_um)
    rows, cols = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    rc = np.column_stack([rows.ravel(), cols.ravel()])
    local = (rc[:, ::-1] + 0.5) * bin_um / MPP  # (col, row) -> (x, y) before the turn
    rot = np.array([[np.cos(ANGLE), -np.sin(ANGLE)], [np.sin(ANGLE), np.cos(ANGLE)]])
    jitter = np.random.default_rng(bin_um).normal(0, 0.2, local.shape)
    return rc, ORIGIN + local @ rot.T + jitter


def write_bin(outs: Path, bin_um: int, *, microns_per_pixel: float | None = MPP) -> Path:
    folder = outs / "binned_outputs" / f"square_{bin_um:03d}um"
    (folder / "spatial").mkdir(parents=True)
    rc, xy = bin_centres(bin_um)
    barcodes = [f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in rc]
    in_tissue = np.hypot(*(xy - TISSUE[0]).T) < TISSUE[1]
    pd.DataFrame({"barcode": barcodes, "in_tissue": in_tissue.astype(np.int32), "array_row": rc[:, 0],
                  "array_col": rc[:, 1], "pxl_row_in_fullres": xy[:, 1], "pxl_col_in_fullres": xy[:, 0]}
                 ).to_parquet(folder / "spatial" / "tissue_positions.parquet")
    keep = np.flatnonzero(in_tissue)  # the filtered matrix holds the in-tissue bins only
    counts = np.random.default_rng(1).poisson(2.0, (len(keep), 6))
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, [barcodes[i] for i in keep],
                 [f"GENE{g}" for g in range(6)])
    sf = {"spot_diameter_fullres": bin_um / MPP, "bin_size_um": float(bin_um), "tissue_hires_scalef": HIRES,
          "tissue_lowres_scalef": LOWRES, "fiducial_diameter_fullres": 400.0, "regist_target_img_scalef": 0.3}
    if microns_per_pixel is not None:
        sf["microns_per_pixel"] = microns_per_pixel
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    full = fullres_image()
    for scale, name in ((HIRES, "tissue_hires_image.png"), (LOWRES, "tissue_lowres_image.png")):
        Image.fromarray(full).resize((round(SIZE[0] * scale), round(SIZE[1] * scale))).save(folder / "spatial" / name)
    return folder


def fullres_image() -> np.ndarray:
    yy, xx = np.mgrid[: SIZE[1], : SIZE[0]]
    img = np.full((SIZE[1], SIZE[0], 3), 245, np.uint8)
    img[np.hypot(xx - TISSUE[0][0], yy - TISSUE[0][1]) < TISSUE[1]] = (200, 90, 160)
    return img


@pytest.fixture
def hd_run(tmp_path) -> Path:
    outs = tmp_path / "Visium_HD_Tiny" / "outs"
    for b in (8, 16):
        write_bin(outs, b)
    return outs.parent


def expected(bin_um: int, barcodes) -> np.ndarray:
    rc, xy = bin_centres(bin_um)
    index = {f"s_{bin_um:03d}um_{r:05d}_{c:05d}-1": i for i, (r, c) in enumerate(rc)}
    return xy[[index[b] for b in barcodes]]


def test_default_bin_hires_png(hd_run):
    sample = read_visium_hd(hd_run)
    assert sample.slide_id == "Visium_HD_Tiny_016um" and sample.adata.uns["visium_hd"]["bin_um"] == 16
    assert sample.image_path.name == "tissue_hires_image.png" and sample.tissue_from == "in_tissue"
    assert sample.um_per_px == pytest.approx(MPP / HIRES, rel=0.02)
    assert "microns_per_pixel" in sample.pixel_size_source
    assert set(sample.pixel_size_sources) == {"scalefactors", "grid", "spot-diameter"}
    for name, value in sample.pixel_size_sources.items():
        assert value == pytest.approx(MPP / HIRES, rel=0.02), name
    np.testing.assert_allclose(sample.coords_px, expected(16, sample.adata.obs_names) * HIRES, atol=1e-6)
    # in-tissue bins only, every one of them, and on the image (inside the tissue disc of the hires PNG)
    rc, xy = bin_centres(16)
    assert sample.n_spots == int((np.hypot(*(xy - TISSUE[0]).T) < TISSUE[1]).sum()) > 50
    w, h = Image.open(sample.image_path).size
    assert (sample.coords_px >= 0).all() and (sample.coords_px[:, 0] < w).all() and (sample.coords_px[:, 1] < h).all()
    pixels = np.asarray(Image.open(sample.image_path).convert("RGB"))
    on = pixels[sample.coords_px[:, 1].astype(int), sample.coords_px[:, 0].astype(int)]
    assert (on[:, 1] < 150).mean() > 0.95  # tissue colour under the bins
    assert sample.adata.n_vars == 6 and sample.adata.obs["array_row"].max() < 12


def test_full_res_image_and_bin_choice(hd_run, tmp_path):
    tif = write_pyramidal_tiff(tmp_path / "he.tif", fullres_image(), um_per_px=MPP)
    for bin_um in (8, 16):
        sample = read_visium_hd(hd_run / "outs", bin_um=bin_um, image=tif, slide_id="s1")
        assert sample.slide_id == "s1" and sample.image_path == tif
        assert sample.um_per_px == pytest.approx(MPP, rel=0.02)
        np.testing.assert_allclose(sample.coords_px, expected(bin_um, sample.adata.obs_names))
        assert all(b.startswith(f"s_{bin_um:03d}um_") for b in sample.adata.obs_names)
        sizes = sample.pixel_size_sources
        assert set(sizes) == {"scalefactors", "grid", "spot-diameter", "metadata"}
        assert all(v == pytest.approx(MPP, rel=0.02) for v in sizes.values())
    grid = read_visium_hd(hd_run, image=tif, pixel_size_from="grid")
    assert grid.um_per_px == pytest.approx(MPP, rel=0.02) and "16 µm square pitch" in grid.pixel_size_source
    # the square_XXXum folder itself
    assert read_visium_hd(hd_run / "outs" / "binned_outputs" / "square_008um").adata.uns["visium_hd"]["bin_um"] == 8
    assert sorted(find_bins(hd_run)) == [8, 16]


def test_pixel_size_fallback_and_disagreement(tmp_path):
    outs = tmp_path / "run" / "outs"
    write_bin(outs, 16, microns_per_pixel=None)
    sample = read_visium_hd(outs)
    assert sample.pixel_size_source.startswith("array grid (16 µm square pitch")
    assert sample.um_per_px == pytest.approx(MPP / HIRES, rel=0.02)
    shutil.rmtree(outs)
    write_bin(outs, 16, microns_per_pixel=MPP * 1.2)
    with pytest.warns(PixelSizeWarning, match=r"square_016um.*disagree by 20%: scalefactors 1\.5 µm/px \(used\) vs .*grid 1\.25"):
        read_visium_hd(outs)


def test_bad_input_names_the_file(hd_run, tmp_path):
    with pytest.raises(InputError, match=r"outs.*no square_002um bins .*8 µm, 16 µm"):
        read_visium_hd(hd_run / "outs", bin_um=2)
    with pytest.raises(FileNotFoundError, match="not a Visium HD output folder"):
        read_visium_hd(tmp_path)
    b16 = hd_run / "outs" / "binned_outputs" / "square_016um"
    b8 = hd_run / "outs" / "binned_outputs" / "square_008um"
    # matrix and positions of different bin sizes: no barcode matches
    shutil.copy(b8 / "filtered_feature_bc_matrix.h5", b16 / "filtered_feature_bc_matrix.h5")
    with pytest.raises(BarcodeError, match=r"square_016um/filtered_feature_bc_matrix\.h5 have no row in .*"
                                           r"square_016um/spatial/tissue_positions\.parquet"):
        read_visium_hd(hd_run)
    table = pd.read_parquet(b8 / "spatial" / "tissue_positions.parquet")
    table.drop(columns="array_col").to_parquet(b8 / "spatial" / "tissue_positions.parquet")
    with pytest.raises(CoordinateError, match=r"tissue_positions\.parquet: tissue positions lack columns \['array_col'\]"):
        read_visium_hd(hd_run, bin_um=8)
    (b8 / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CoordinateError, match=r"tissue_positions\.parquet: cannot read"):
        read_visium_hd(hd_run, bin_um=8)
    (b8 / "spatial" / "tissue_positions.parquet").unlink()
    with pytest.raises(FileNotFoundError, match=r"square_008um/spatial/tissue_positions\.parquet"):
        read_visium_hd(hd_run, bin_um=8)


def test_prep_visium_hd(hd_run, tmp_path, capsys):
    from stalign.cli import main

    out = tmp_path / "shards"
    assert main(["prep", "--visium-hd", str(hd_run), "--out", str(out), "--n-top-genes", "4", "--patch-px", "16",
                 "--spot-um", "32", "--niche-um", "64", "--quiet"]) == 0
    slide = json.loads((out / "manifest.json").read_text())["slides"][0]
    assert slide["slide_id"] == "Visium_HD_Tiny_016um" and slide["um_per_px"] == pytest.approx(MPP / HIRES, rel=0.02)
    assert slide["n_spots"] == read_visium_hd(hd_run).n_spots  # every in-tissue bin of the tissue disc
    capsys.readouterr()
    assert main(["prep", "--visium-hd", str(hd_run), "--bin-um", "2", "--out", str(tmp_path / "o2"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "square_002um" in err[0] and str(hd_run) in err[0]
    assert not (tmp_path / "o2").exists()


def test_missing_pyarrow_names_the_extra(hd_run, monkeypatch):
    from stofm.util.errors import MissingDependencyError

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    with pytest.raises(MissingDependencyError, match=r"tissue_positions\.parquet: .*pip install 'stalign\[visium-hd\]'"):
        read_visium_hd(hd_run)


def test_prep_samples_row_with_full_res_image(hd_run, tmp_path):
    from stalign.cli import main

    tif = write_pyramidal_tiff(tmp_path / "he.tif", fullres_image(), um_per_px=MPP)
    (tmp_path / "slides.csv").write_text(f"visium_hd,image,bin_um,slide_id\n{hd_run},he.tif,8,hd8\n")
    out = tmp_path / "shards"
    assert main(["prep", "--samples", str(tmp_path / "slides.csv"), "--out", str(out), "--n-top-genes", "4",
                 "--patch-px", "16", "--spot-um", "32", "--niche-um", "64", "--quiet"]) == 0
    slide = json.loads((out / "manifest.json").read_text())["slides"][0]
    assert slide["slide_id"] == "hd8" and slide["um_per_px"] == pytest.approx(MPP, rel=0.02)
    assert slide["n_spots"] == read_visium_hd(hd_run, bin_um=8, image=tif).n_spots


def test_spaceranger_reader_points_hd_folders_here(hd_run):
    from stalign.data.readers import read_spaceranger

    with pytest.raises(CoordinateError, match=r"square_016um/spatial/tissue_positions\.parquet: .*--visium-hd"):
        read_spaceranger(hd_run / "outs" / "binned_outputs" / "square_016um")
