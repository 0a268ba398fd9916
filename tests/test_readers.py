"""Readers on real data: the squidpy Visium crop, the squidpy Space Ranger folder, a HEST folder built from them."""
from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from stalign.data.errors import (
    BarcodeError,
    CoordinateError,
    DataPrepError,
    ExpressionError,
    GeneNameError,
    PixelSizeError,
)
from stalign.data.readers import list_hest_samples, read_anndata_image, read_hest, read_spaceranger
from stalign.data.slide import open_slide, write_pyramidal_tiff
from stalign.data.tenx import read_10x_h5
from stalign.data.tissue import spots_on_tissue

SPOT_DIAMETER_PX = 89.44476048022638  # uns['spatial']['V1_Adult_Mouse_Brain']['scalefactors'] of the crop


@pytest.fixture()
def crop_adata(squidpy_crop):
    return ad.read_h5ad(squidpy_crop / "test_data.h5ad")


def test_anndata_image_pixel_size_rules(squidpy_crop):
    h5ad, jpg = squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg"
    auto = read_anndata_image(h5ad, jpg)
    # spot_diameter_fullres spans Space Ranger's theoretical 65 µm spot; the crop has no array_row/array_col
    assert auto.um_per_px == pytest.approx(65 / SPOT_DIAMETER_PX) and auto.um_per_px == pytest.approx(0.7267, 1e-3)
    assert auto.pixel_size_source.startswith("Visium spot diameter (65 µm")
    assert auto.pixel_size_sources == pytest.approx({"spot-diameter": 0.7267, "pitch": 100 / 138.0}, rel=1e-3)
    assert auto.slide_id == "test_data" and auto.source_files == [h5ad, jpg] and auto.image_path == jpg
    assert auto.coords_px.dtype == np.float64 and auto.coords_px.shape == (49, 2)
    np.testing.assert_array_equal(auto.coords_px, auto.adata.obsm["spatial"])
    assert list(auto.adata.obs_names[:2]) == ["AAATTGCGGCGGTTCT-1", "AACGCGAACGGCAACA-1"]
    pitch = read_anndata_image(h5ad, jpg, pixel_size_from="pitch")
    assert pitch.um_per_px == pytest.approx(100 / 137.5, rel=0.01) and "pitch" in pitch.pixel_size_source
    with pytest.warns(UserWarning, match=r"disagree by 45%: user flag 0\.5 µm/px \(used\) vs spot-diameter 0\.7267"):
        flag = read_anndata_image(h5ad, jpg, um_per_px=0.5, pixel_size_from="pitch", slide_id="s1")
    assert (flag.um_per_px, flag.pixel_size_source, flag.slide_id) == (0.5, "user flag", "s1")
    assert flag.pixel_size_sources["user flag"] == 0.5 and "spot-diameter" in flag.pixel_size_sources
    with pytest.raises(PixelSizeError, match=r"test_img\.jpg.*um_per_px.*spot-diameter"):
        read_anndata_image(h5ad, jpg, pixel_size_from="metadata")  # the JPEG carries no physical size


def test_no_pixel_size_anywhere_is_an_error(crop_adata, squidpy_crop):
    del crop_adata.uns["spatial"]
    with pytest.raises(PixelSizeError) as info:
        read_anndata_image(crop_adata, squidpy_crop / "test_img.jpg")
    msg = str(info.value)
    assert "test_img.jpg" in msg and "um_per_px" in msg and "pitch" in msg and "has no uns['spatial']" in msg


def test_slide_metadata_wins_in_auto(crop_adata, squidpy_crop, tmp_path):
    image = np.asarray(Image.open(squidpy_crop / "test_img.jpg"))
    tif = write_pyramidal_tiff(tmp_path / "crop.tif", image, um_per_px=0.72, tile=128)
    sample = read_anndata_image(crop_adata, tif)
    assert sample.um_per_px == pytest.approx(0.72, rel=1e-4)
    assert sample.pixel_size_source == "TIFF resolution tags (openslide.mpp-x)"
    diameter = read_anndata_image(crop_adata, tif, pixel_size_from="spot-diameter")
    assert diameter.um_per_px == pytest.approx(65 / SPOT_DIAMETER_PX)
    # metadata that contradicts the spot diameter (2 µm/px vs 0.727) is not silently trusted in "auto"
    wrong = write_pyramidal_tiff(tmp_path / "wrong.tif", image, um_per_px=2.0, tile=128)
    with pytest.raises(PixelSizeError, match=r"disagree.*TIFF resolution tags.*2 µm/px.*Visium spot diameter"):
        read_anndata_image(crop_adata, wrong)
    assert read_anndata_image(crop_adata, wrong, pixel_size_from="metadata").um_per_px == pytest.approx(2.0)
    # the spots' crops from the pyramid equal the crops from the JPEG at the same place
    with open_slide(tif) as pyr, open_slide(squidpy_crop / "test_img.jpg") as jpg:
        a, _ = pyr.read_crops(sample.coords_px[:3], 180, 90)
        b, _ = jpg.read_crops(sample.coords_px[:3], 180, 90)
        assert np.abs(a.astype(int) - b.astype(int)).mean() < 3


def _write(adata, path):
    adata.write_h5ad(path)
    return path


def test_coordinates_outside_or_nan(crop_adata, squidpy_crop, tmp_path):
    jpg = squidpy_crop / "test_img.jpg"
    crop_adata.obsm["spatial"] = crop_adata.obsm["spatial"].astype(float)
    crop_adata.obsm["spatial"][[3, 7], 0] += 5000
    with pytest.warns(UserWarning, match=r"bad\.h5ad.*dropped 2 of 49 spots that lie outside.*test_img\.jpg") as w:
        sample = read_anndata_image(_write(crop_adata, tmp_path / "bad.h5ad"), jpg)  # dropped, as HEST does
    assert crop_adata.obs_names[3] in str(w[0].message) and sample.n_spots == 47
    assert sample.dropped_out_of_image == {"count": 2, "barcodes": list(crop_adata.obs_names[[3, 7]])}
    crop_adata.obsm["spatial"][[3, 7], 0] -= 5000
    crop_adata.obsm["spatial"][5, 1] = np.nan
    with pytest.raises(CoordinateError, match=r"nan\.h5ad.*1 spots have NaN"):
        read_anndata_image(_write(crop_adata, tmp_path / "nan.h5ad"), jpg)
    with pytest.raises(CoordinateError, match="no obsm\\['xy'\\]"):
        read_anndata_image(crop_adata, jpg, spatial_key="xy")
    # half a crop beyond the edge is allowed (the crop still overlaps the image)
    crop_adata.obsm["spatial"][5] = [-100.0, 10.0]
    assert read_anndata_image(crop_adata, jpg).coords_px[5, 0] == -100.0


@pytest.mark.parametrize("value, match", [(np.nan, "1 NaN"), (np.inf, "1 infinite"), (-1.0, "1 negative")])
def test_bad_expression_values(crop_adata, squidpy_crop, tmp_path, value, match):
    x = crop_adata.X.toarray()
    x[2, 10] = value
    crop_adata.X = x
    with pytest.raises(ExpressionError, match=rf"expr\.h5ad: expression has .*{match}"):
        read_anndata_image(_write(crop_adata, tmp_path / "expr.h5ad"), squidpy_crop / "test_img.jpg")


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_genes_and_empty_data(crop_adata, squidpy_crop, tmp_path):
    jpg = squidpy_crop / "test_img.jpg"
    names = list(crop_adata.var_names)
    names[5] = names[4]
    crop_adata.var_names = names
    path = _write(crop_adata, tmp_path / "dup.h5ad")
    with pytest.raises(GeneNameError, match=rf"dup\.h5ad: 1 duplicated gene names, e.g. '{names[4]}'.*make_unique"):
        read_anndata_image(path, jpg)
    fixed = read_anndata_image(path, jpg, make_unique=True)
    assert fixed.adata.var_names.is_unique and fixed.adata.var_names[5] == f"{names[4]}-1"
    with pytest.raises(ExpressionError, match=r"empty\.h5ad: no spots"):
        read_anndata_image(_write(crop_adata[:0].copy(), tmp_path / "empty.h5ad"), jpg)
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        read_anndata_image(tmp_path / "missing.h5ad", jpg)
    (tmp_path / "junk.h5ad").write_bytes(b"not hdf5")
    with pytest.raises(DataPrepError, match="junk.h5ad"):
        read_anndata_image(tmp_path / "junk.h5ad", jpg)


def test_spaceranger_folder(fetched):
    folder = fetched("squidpy-spaceranger")
    # the fixture's hires PNG is an all-black placeholder beside a real lowres image: the lowres one is used
    with pytest.warns(UserWarning, match="tissue_hires_image.png is a blank/uniform placeholder"):
        sample = read_spaceranger(folder)
    scalef, diameter = 0.045004502, 89.42751063343188
    assert sample.image_path == folder / "spatial" / "tissue_lowres_image.png"
    assert sample.adata.shape == (100, 100) and sample.coords_px.shape == (100, 2)
    # the array grid of the positions file (100 µm hex pitch) agrees with the 65 µm spot_diameter_fullres
    assert sample.um_per_px == pytest.approx(65 / (diameter * scalef), rel=0.005)
    assert "tissue_lowres_scalef" in sample.pixel_size_source and "array grid" in sample.pixel_size_source
    assert sample.pixel_size_sources["spot-diameter"] == pytest.approx(65 / (diameter * scalef))
    # first row of tissue_positions_list.csv: AAACAAGTATCTCCCA-1,1,50,102,8513,9811 (row px, col px)
    i = list(sample.adata.obs_names).index("AAACAAGTATCTCCCA-1")
    np.testing.assert_allclose(sample.coords_px[i], [9811 * scalef, 8513 * scalef])
    counts = sample.adata.X.toarray()
    assert (counts == np.round(counts)).all() and counts.sum() > 0  # raw integer counts kept
    raw = read_10x_h5(folder / "filtered_feature_bc_matrix.h5")
    np.testing.assert_array_equal(raw[sample.adata.obs_names].X.toarray(), counts)
    assert {p.name for p in sample.source_files} >= {"filtered_feature_bc_matrix.h5", "scalefactors_json.json",
                                                     "tissue_positions_list.csv", "tissue_lowres_image.png"}
    with open_slide(folder / "spatial" / "tissue_hires_image.png") as slide:  # the all-black placeholder
        crops, padded = slide.read_crops(sample.coords_px * 0.150015 / scalef, 112 / sample.um_per_px, 32)
        assert crops.shape == (100, 32, 32, 3) and not padded.any() and (crops == 0).all()
        assert not spots_on_tissue(slide, sample.coords_px).any()  # black is not stained tissue


def _copy_spaceranger(fetched, tmp_path):
    folder = tmp_path / "outs"
    shutil.copytree(fetched("squidpy-spaceranger"), folder)
    return folder


def test_spaceranger_header_positions_and_wrong_image(fetched, tmp_path):
    folder = _copy_spaceranger(fetched, tmp_path)
    old = folder / "spatial" / "tissue_positions_list.csv"
    header = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
    (folder / "spatial" / "tissue_positions.csv").write_text(header + old.read_text())
    old.unlink()
    sample = read_spaceranger(tmp_path)  # finds outs/, reads the v2 header file
    assert sample.adata.n_obs == 100 and sample.slide_id == tmp_path.name
    assert folder / "spatial" / "tissue_positions.csv" in sample.source_files
    # the hires PNG passed as if it were the full-resolution image: full-res coordinates fall outside it
    with pytest.raises(CoordinateError, match=r"tissue_positions\.csv.*lie outside.*tissue_hires_image\.png"):
        read_spaceranger(folder, image=folder / "spatial" / "tissue_hires_image.png", um_per_px=0.6)


def test_spaceranger_barcode_mismatch(fetched, tmp_path):
    folder = _copy_spaceranger(fetched, tmp_path)
    pos = folder / "spatial" / "tissue_positions_list.csv"
    pos.write_text(pos.read_text().replace("-1,", "-2,"))
    with pytest.raises(BarcodeError) as info:
        read_spaceranger(folder)
    msg = str(info.value)
    assert "filtered_feature_bc_matrix.h5" in msg and "tissue_positions_list.csv" in msg
    assert "100 of 100" in msg and "AAACAAGTATCTCCCA-1" in msg and "AAACAAGTATCTCCCA-2" in msg


def test_spaceranger_drops_spots_outside_tissue(fetched, tmp_path):
    folder = _copy_spaceranger(fetched, tmp_path)
    pos = folder / "spatial" / "tissue_positions_list.csv"
    lines = pos.read_text().splitlines()
    extra = "ZZZZ-1,0,1,1,5000,5000"  # an off-tissue spot absent from the filtered matrix: fine, ignored
    pos.write_text("\n".join(lines + [extra]) + "\n")
    assert read_spaceranger(folder).adata.n_obs == 100
    pos.write_text("\n".join(lines + ["ZZZZ-1,1,1,1,5000,5000"]) + "\n")  # in tissue, no counts (subset matrix)
    with pytest.warns(UserWarning, match=r"1 in-tissue positions of .*tissue_positions_list\.csv have no counts in "
                                         r".*filtered_feature_bc_matrix\.h5 .*'ZZZZ-1'.*the matrix's 100 barcodes"):
        assert read_spaceranger(folder).adata.n_obs == 100  # the matrix's barcodes, as scanpy's read_visium
    lines[0] = lines[0].replace(",1,", ",0,", 1)  # a matrix barcode marked off-tissue: dropped
    pos.write_text("\n".join(lines) + "\n")
    sample = read_spaceranger(folder)
    assert sample.adata.n_obs == 99 and "AAACAAGTATCTCCCA-1" not in sample.adata.obs_names
    pos.write_text("\n".join(line.replace(",1,", ",0,", 1) for line in lines) + "\n")
    with pytest.raises(CoordinateError, match=r"tissue_positions_list\.csv: none of the 100 spots"):
        read_spaceranger(folder)


def _hest_folder(tmp_path, squidpy_crop, meta: dict | None, wsi_mpp: float | None = 0.6):
    root = tmp_path / "hest"
    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    image = np.asarray(Image.open(squidpy_crop / "test_img.jpg"))
    write_pyramidal_tiff(root / "wsis" / "TENX0.tif", image, um_per_px=wsi_mpp, tile=128)
    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    del adata.uns["spatial"]
    adata.write_h5ad(root / "st" / "TENX0.h5ad")
    adata.write_h5ad(root / "st" / "NOWSI.h5ad")  # no slide: not listed
    if meta is not None:
        (root / "metadata" / "TENX0.json").write_text(json.dumps(meta))
    return root


def test_hest_layout(tmp_path, squidpy_crop):
    root = _hest_folder(tmp_path, squidpy_crop, {"pixel_size_um_estimated": 0.615, "pixel_size_um_embedded": 0.5})
    assert list_hest_samples(root) == ["TENX0"]
    sample = read_hest(root, "TENX0")
    assert sample.slide_id == "TENX0" and sample.image_path == root / "wsis" / "TENX0.tif"
    assert sample.um_per_px == 0.615 and "pixel_size_um_estimated" in sample.pixel_size_source
    assert sample.coords_px.shape == (49, 2) and len(sample.source_files) == 3
    assert read_hest(root, "TENX0", pixel_size_from="hest-embedded").um_per_px == 0.5
    tiff = read_hest(root, "TENX0", pixel_size_from="metadata")
    assert tiff.um_per_px == pytest.approx(0.6, rel=1e-4) and tiff.pixel_size_source.startswith("TIFF")
    with open_slide(sample.image_path) as slide:  # the WSI level 0 is the original JPEG's pixels
        ref = np.asarray(Image.open(squidpy_crop / "test_img.jpg"))
        np.testing.assert_array_equal(slide.read_region_level0(100, 200, 64, 48), ref[200:248, 100:164])
    with pytest.raises(FileNotFoundError, match="NOWSI"):
        read_hest(root, "NOWSI")


def test_hest_pixel_size_fallbacks(tmp_path, squidpy_crop):
    root = _hest_folder(tmp_path, squidpy_crop, {"pixel_size_um_estimated": None})
    sample = read_hest(root, "TENX0")  # metadata lacks it: the slide's own TIFF tags are used, and said so
    assert sample.um_per_px == pytest.approx(0.6, rel=1e-4) and "TIFF resolution tags" in sample.pixel_size_source
    bare = _hest_folder(tmp_path / "b", squidpy_crop, None, wsi_mpp=None)
    with pytest.raises(PixelSizeError, match=r"TENX0.*pixel_size_um_estimated.*um_per_px"):
        read_hest(bare, "TENX0")
    assert read_hest(bare, "TENX0", um_per_px=0.7).pixel_size_source == "user flag"
    with pytest.raises(PixelSizeError, match=r"spot pitch in µm is not known.*--spot-pitch-um"):
        read_hest(bare, "TENX0", pixel_size_from="pitch")  # no inter_spot_dist without metadata: never assumed
    pitch = read_hest(bare, "TENX0", pixel_size_from="pitch", spot_pitch_um=100)
    assert pitch.um_per_px == pytest.approx(100 / 137.5, rel=0.01)
    with pytest.raises(PixelSizeError, match="no spot_diameter_fullres"):
        read_hest(bare, "TENX0", pixel_size_from="spot-diameter")  # uns['spatial'] was removed


def test_10x_h5_v2_layout_and_gene_ids(fetched, tmp_path):
    import h5py

    src = fetched("squidpy-spaceranger") / "filtered_feature_bc_matrix.h5"
    v3 = read_10x_h5(src)
    with h5py.File(src) as f, h5py.File(tmp_path / "v2.h5", "w") as g:
        grp = g.create_group("mm10")
        for key in ("data", "indices", "indptr", "shape", "barcodes"):
            grp[key] = f["matrix"][key][()]
        grp["genes"] = f["matrix/features/id"][()]
        grp["gene_names"] = np.array([f"G{i}".encode() for i in range(100)])
    v2 = read_10x_h5(tmp_path / "v2.h5")
    assert list(v2.var_names[:2]) == ["G0", "G1"] and list(v2.obs_names) == list(v3.obs_names)
    np.testing.assert_array_equal(v2.X.toarray(), v3.X.toarray())
    assert list(read_10x_h5(tmp_path / "v2.h5", var_names="gene_ids").var_names) == list(v3.var["gene_ids"])
    (tmp_path / "bad.h5").write_bytes(b"nope")
    with pytest.raises(ExpressionError, match=r"bad\.h5: cannot read the 10x"):
        read_10x_h5(tmp_path / "bad.h5")


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicated_barcodes(crop_adata, squidpy_crop, tmp_path):
    names = list(crop_adata.obs_names)
    names[1] = names[0]
    crop_adata.obs_names = names
    with pytest.raises(BarcodeError, match=rf"dupbc\.h5ad: duplicated barcodes.*'{names[0]}'"):
        read_anndata_image(_write(crop_adata, tmp_path / "dupbc.h5ad"), squidpy_crop / "test_img.jpg")


def test_spaceranger_blank_hires_falls_back_to_lowres_and_trusts_in_tissue(fetched, tmp_path):
    folder = _copy_spaceranger(fetched, tmp_path)
    spatial = folder / "spatial"
    # the fixture's hires PNG is an all-black placeholder; give the folder a real lowres image
    sf = json.loads((spatial / "scalefactors_json.json").read_text())
    hires = Image.open(spatial / "tissue_hires_image.png")
    w, h = (round(s * sf["tissue_lowres_scalef"] / sf["tissue_hires_scalef"]) for s in hires.size)
    texture = np.random.default_rng(0).integers(60, 230, (h, w, 3), dtype=np.uint8)
    Image.fromarray(texture).save(spatial / "tissue_lowres_image.png")
    with pytest.warns(UserWarning, match=r"tissue_hires_image\.png is a blank/uniform placeholder; using "
                                         r"tissue_lowres_image\.png"):
        sample = read_spaceranger(folder)
    assert sample.image_path.name == "tissue_lowres_image.png" and "lowres" in sample.pixel_size_source
    assert sample.tissue_from == "in_tissue"  # the default trusts Space Ranger's call
    assert read_spaceranger(folder, tissue_from="image").tissue_from == "image"
    with pytest.raises(ValueError, match="tissue_from"):
        read_spaceranger(folder, tissue_from="mask")
