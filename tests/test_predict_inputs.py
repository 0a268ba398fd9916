"""`stalign predict` (and retrieve, heatmaps) read every slide input prep reads: a Space Ranger folder written here
from the real Visium crop (known geometry: hires PNG at 0.8x, spot pitch 137 full-res px = 100 µm), AnnData +
image, a HEST-1k sample, a Visium HD folder; the reference/query checks warn with their numbers; bad input is one
line and nothing is written."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stalign.cli import main
from stalign.tasks.query_checks import QueryMismatchWarning, ReferenceSummary, check_query, open_reference


def _sibling(name: str):
    """A sibling test module (pytest imports tests with importlib: they are not on sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_HD = _sibling("test_visium_hd")  # its 10x writers: write_10x_h5 (the matrix), write_bin (a Visium HD bin folder)
write_10x_h5, write_bin = _HD.write_10x_h5, _HD.write_bin

PITCH_PX = 137.0  # full-res px between neighbouring spot centres of the crop (100 µm)
HIRES = 0.8


def write_spaceranger(folder: Path, crop: Path, *, hires: float | None = HIRES, genes: list[str] | None = None,
                      off_tissue: int = 3) -> Path:
    """A Space Ranger ``outs`` folder from the real crop: its 49 spots in tissue (counts in the filtered matrix)
    plus ``off_tissue`` positions marked 0, array_row/col on the Visium grid, hires (``hires`` x, None: none)
    and lowres (0.1x) PNGs."""
    src = ad.read_h5ad(crop / "test_data.h5ad")
    xy = np.asarray(src.obsm["spatial"], np.float64)
    col = np.round((xy[:, 0] - xy[:, 0].min()) / (PITCH_PX / 2)).astype(int)
    row = np.round((xy[:, 1] - xy[:, 1].min()) / (PITCH_PX * np.sqrt(3) / 2)).astype(int)
    names = list(src.obs_names) + [f"OFFTISSUE{i}-1" for i in range(off_tissue)]
    extra = np.array([[20.0 + 30 * i, 20.0] for i in range(off_tissue)]).reshape(-1, 2)
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    pd.DataFrame({"barcode": names, "in_tissue": [1] * len(xy) + [0] * off_tissue,
                  "array_row": np.r_[row, [0] * off_tissue], "array_col": np.r_[col, [0] * off_tissue],
                  "pxl_row_in_fullres": np.r_[xy[:, 1], extra[:, 1]], "pxl_col_in_fullres": np.r_[xy[:, 0], extra[:, 0]]}
                 ).to_csv(spatial / "tissue_positions.csv", index=False)
    genes = list(src.var_names) if genes is None else genes
    x = src[:, [g for g in genes if g in src.var_names]].X
    x = np.asarray(x.toarray() if hasattr(x, "toarray") else x)
    counts = np.zeros((len(xy), len(genes)))
    counts[:, [i for i, g in enumerate(genes) if g in src.var_names]] = np.round(np.expm1(x) * 3)
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, list(src.obs_names), genes)
    full = Image.open(crop / "test_img.jpg").convert("RGB")
    scales = {"tissue_lowres_scalef": 0.1, **({"tissue_hires_scalef": hires} if hires else {})}
    for key, scale in scales.items():
        name = key.replace("_scalef", "_image.png")
        full.resize((round(full.width * scale), round(full.height * scale)), Image.Resampling.LANCZOS).save(
            spatial / name)
    sf = {"spot_diameter_fullres": 89.44476, "fiducial_diameter_fullres": 144.48769, **scales}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    return folder


def predict_argv(setup, out: Path, *inputs: str) -> list[str]:
    return ["predict", "--model", str(setup["ckpt"]), *inputs, "--reference", str(setup["shards"]), "--out", str(out),
            "--k", "3", "--workers", "0", "--heatmap-genes", "none", "--quiet"]


def mismatch_notes(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, QueryMismatchWarning)]


@pytest.fixture(scope="module")
def space_ranger(predict_setup, squidpy_crop, tmp_path_factory):
    """A Space Ranger folder of the real crop, its prediction (``stalign predict --spaceranger``) and the query
    warnings that run gave."""
    root = tmp_path_factory.mktemp("sr_predict")
    folder = write_spaceranger(root / "sr", squidpy_crop)
    out = root / "pred.h5ad"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(predict_argv(predict_setup, out, "--spaceranger", str(folder))) == 0
    return {"folder": folder, "out": out, "pred": ad.read_h5ad(out), "notes": mismatch_notes(record)}


def test_space_ranger_prediction_has_the_in_tissue_spots_on_the_hires_image(space_ranger, squidpy_crop):
    folder, pred = space_ranger["folder"], space_ranger["pred"]
    assert space_ranger["notes"] == []  # 0.8x hires: 0.91 vs 0.73 µm/px, 112 µm = 123 px -> 32 px, same genes
    src = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    assert list(pred.obs_names) == list(src.obs_names)  # the in-tissue barcodes, none of the off-tissue ones
    assert pred.obs["in_tissue"].all()
    np.testing.assert_allclose(pred.obsm["spatial"], np.asarray(src.obsm["spatial"], float) * HIRES)
    s = pred.uns["stalign"]
    assert s["slide"] == str(folder / "spatial" / "tissue_hires_image.png")
    assert s["um_per_px"] == pytest.approx(100 / (PITCH_PX * HIRES), rel=0.02)  # the physical spot pitch
    assert len(s["pixel_size_sources"]) >= 2 and s["um_per_px"] in s["pixel_size_sources"].values()
    assert s["library_id"] == "sr" and list(pred.uns["spatial"]) == ["sr"]  # the run's name, as scanpy's read_visium
    lib = pred.uns["spatial"]["sr"]
    sf, hires = lib["scalefactors"], lib["images"]["hires"]
    assert sf["spot_diameter_fullres"] * s["um_per_px"] == pytest.approx(55.0)  # a Visium capture spot
    with Image.open(folder / "spatial" / "tissue_hires_image.png") as im:  # 'fullres' = the image used
        assert hires.shape[1] == pytest.approx(im.width * sf["tissue_hires_scalef"], abs=1)
        assert hires.shape[0] == pytest.approx(im.height * sf["tissue_hires_scalef"], abs=1)


def test_space_ranger_folder_with_its_full_resolution_image(predict_setup, space_ranger, squidpy_crop, tmp_path):
    out = tmp_path / "full.h5ad"
    image = squidpy_crop / "test_img.jpg"  # the image Space Ranger was given: positions are in its pixels
    assert main(predict_argv(predict_setup, out, "--spaceranger", str(space_ranger["folder"]), "--image",
                             str(image))) == 0
    pred = ad.read_h5ad(out)
    s = pred.uns["stalign"]
    assert s["slide"] == str(image) and s["um_per_px"] == pytest.approx(100 / PITCH_PX, rel=0.02)
    src = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    np.testing.assert_allclose(pred.obsm["spatial"], np.asarray(src.obsm["spatial"], float))  # unscaled
    sf = pred.uns["spatial"][s["library_id"]]["scalefactors"]
    assert sf["spot_diameter_fullres"] * s["um_per_px"] == pytest.approx(55.0)


def test_sc_pl_spatial_draws_the_spots_on_the_tissue_at_their_size(space_ranger):
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    pred = space_ranger["pred"]
    lib = pred.uns["stalign"]["library_id"]
    sf, hires = pred.uns["spatial"][lib]["scalefactors"], pred.uns["spatial"][lib]["images"]["hires"]
    ax = sc.pl.spatial(pred, color=pred.var_names[0], library_id=lib, show=False)[0]
    circles = [path.vertices for path in ax.collections[0].get_paths()]  # drawn in the order of their values
    drawn = np.array([(v.max(0) + v.min(0)) / 2 for v in circles])
    expect = pred.obsm["spatial"] * sf["tissue_hires_scalef"]
    np.testing.assert_allclose(drawn[np.lexsort(drawn.T)], expect[np.lexsort(expect.T)], atol=1e-6)
    sizes = np.array([v.max(0) - v.min(0) for v in circles])
    np.testing.assert_allclose(sizes, sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"], rtol=1e-6)
    pixels = hires[drawn[:, 1].astype(int), drawn[:, 0].astype(int)].astype(float)
    assert (pixels.mean(1) < 230).mean() > 0.9  # on stained (non-white) pixels of the image drawn under them


def test_predict_reads_an_anndata_and_its_image(predict_setup, squidpy_crop, tmp_path):
    from stalign.data.readers import read_anndata_image

    out = tmp_path / "a.h5ad"
    h5ad, image = squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg"
    assert main(predict_argv(predict_setup, out, "--h5ad", str(h5ad), "--image", str(image))) == 0
    pred, sample = ad.read_h5ad(out), read_anndata_image(h5ad, image)
    assert list(pred.obs_names) == list(sample.adata.obs_names) and "leiden" in pred.obs  # obs carried over
    assert pred.uns["stalign"]["um_per_px"] == pytest.approx(sample.um_per_px)
    assert pred.uns["stalign"]["pixel_size_source"] == sample.pixel_size_source
    np.testing.assert_allclose(pred.obsm["spatial"], np.asarray(sample.coords_px))


def test_predict_reads_a_hest_sample(predict_setup, squidpy_crop, tmp_path):
    hest = tmp_path / "hest"
    for sub in ("st", "wsis", "metadata"):
        (hest / sub).mkdir(parents=True)
    shutil.copy(squidpy_crop / "test_data.h5ad", hest / "st" / "S1.h5ad")
    shutil.copy(squidpy_crop / "test_img.jpg", hest / "wsis" / "S1.jpg")
    (hest / "metadata" / "S1.json").write_text(json.dumps({"pixel_size_um_estimated": 0.73}))
    assert main(predict_argv(predict_setup, tmp_path / "h.h5ad", "--hest", str(hest), "S1")) == 0
    pred = ad.read_h5ad(tmp_path / "h.h5ad")
    assert pred.uns["stalign"]["um_per_px"] == 0.73
    assert "pixel_size_um_estimated" in pred.uns["stalign"]["pixel_size_source"]
    src = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    assert list(pred.obs_names) == list(src.obs_names)
    np.testing.assert_allclose(pred.obsm["spatial"], np.asarray(src.obsm["spatial"], float))


def test_predict_reads_a_visium_hd_folder(predict_setup, tmp_path):
    outs = tmp_path / "hd" / "outs"
    write_bin(outs, 16)
    with pytest.warns(QueryMismatchWarning, match=r"measures 0 of the model's 20 panel genes \(0%"):
        assert main(predict_argv(predict_setup, tmp_path / "hd.h5ad", "--visium-hd", str(outs.parent))) == 0
    pred = ad.read_h5ad(tmp_path / "hd.h5ad")
    s = pred.uns["stalign"]
    assert s["um_per_px"] == pytest.approx(0.25 / 0.2)  # 0.25 µm/px full-res, hires PNG at 0.2
    sf = pred.uns["spatial"][s["library_id"]]["scalefactors"]
    assert sf["spot_diameter_fullres"] * s["um_per_px"] == pytest.approx(16.0)  # one 16 µm bin
    assert all(b.startswith("s_016um_") for b in pred.obs_names) and pred.n_obs > 50


def test_each_check_warns_with_its_numbers(predict_setup, squidpy_crop, tmp_path):
    genes = predict_setup["manifest"]["genes"]
    # a lowres-only folder (0.1x: ~7.3 µm/px, 15.3 px blown up to 32) measuring 5 of the 20 panel genes
    folder = write_spaceranger(tmp_path / "sr", squidpy_crop, hires=None, genes=genes[:5] + ["Other1", "Other2"])
    with pytest.warns(QueryMismatchWarning) as record:
        assert main(predict_argv(predict_setup, tmp_path / "p.h5ad", "--spaceranger", str(folder))) == 0
    notes = " ".join(mismatch_notes(record))
    mpp = ad.read_h5ad(tmp_path / "p.h5ad").uns["stalign"]["um_per_px"]
    ref = predict_setup["manifest"]["slides"][0]["um_per_px"]
    assert f"{mpp:.4g} µm/px, reference shards {predict_setup['shards']} {ref:.4g} µm/px" in notes
    assert f"{mpp / ref:.2f}x apart (more than 1.5x)" in notes
    assert f"spans {112 / mpp:.1f} px of the image at {mpp:.4g} µm/px and is blown up {32 * mpp / 112:.1f}x to 32 px" \
        in notes
    assert "measures 5 of the model's 20 panel genes (25%, under 50%)" in notes
    assert ad.read_h5ad(tmp_path / "p.h5ad").uns["stalign"]["query_warnings"].count(" | ") == 2


def test_check_query_numbers_for_reference_slides_species_and_old_banks():
    from stalign.data.crop_spec import CropSpec
    from stalign.tasks.retrieval import ReferenceBank

    crop = CropSpec(patch_px=224)
    blown = ReferenceSummary(info={}, um_per_px={"lowres": 7.0, "full": 0.5}, where="reference R")
    with pytest.warns(QueryMismatchWarning):
        notes = check_query(blown, crop=crop, query_um_per_px=0.5, query="Q", model_genes=["A", "B", "C"],
                            query_genes=["a", "b", "X"])
    assert any("R: 1 of 2 slides had their 112 µm spot crops blown up more than 2x to 224 px, e.g. lowres (7 µm/px: "
               "16.0 px blown up 14.0x)" in n for n in notes)
    assert any("measures 0 of the model's 3 panel genes (0%" in n and "2 match ignoring case" in n for n in notes)
    bank = ReferenceBank(embeddings=np.ones((3, 8)), expression=np.ones((3, 3)), genes=["A", "B", "C"])
    with pytest.warns(QueryMismatchWarning, match="records no pixel size") as record:
        check_query(open_reference(bank), crop=crop, query_um_per_px=0.5, query="Q", model_genes=["A", "B", "C"])
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to say: 1.4x apart, 1.6x blown up, 2 of 3 genes
        assert check_query(ReferenceSummary(info={}, um_per_px={"s": 0.35}, where="R"), crop=crop,
                           query_um_per_px=0.49, query="Q", model_genes=["A", "B", "C"], query_genes=["A", "B"]) == []


def test_retrieve_reads_a_space_ranger_folder(predict_setup, space_ranger, tmp_path):
    assert main(["retrieve", "image", "--model", str(predict_setup["ckpt"]), "--spaceranger",
                 str(space_ranger["folder"]), "--reference", str(predict_setup["shards"]), "--workers", "0",
                 "--quiet", "--k", "2", "--out", str(tmp_path / "hits.csv")]) == 0
    hits = pd.read_csv(tmp_path / "hits.csv")
    assert set(hits["query_spot"]) == set(space_ranger["pred"].obs_names) and len(hits) == 2 * 49


def test_heatmaps_take_the_folder_and_refuse_another_image(predict_setup, space_ranger, squidpy_crop, tmp_path,
                                                         capsys):
    gene, pred = predict_setup["manifest"]["genes"][0], str(space_ranger["out"])
    assert main(["heatmaps", pred, "--genes", gene, "--out", str(tmp_path / "maps"),
                 "--spaceranger", str(space_ranger["folder"])]) == 0
    assert len(list((tmp_path / "maps").glob("*.png"))) == 1
    capsys.readouterr()
    full = tmp_path / "full.jpg"  # the full-resolution image: the prediction's hires-PNG spots do not fit it
    shutil.copy(squidpy_crop / "test_img.jpg", full)
    assert main(["heatmaps", pred, "--genes", gene, "--out", str(tmp_path / "maps2"),
                 "--spaceranger", str(space_ranger["folder"]), "--image", str(full)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "full.jpg" in err and "tissue_hires_image.png" in err, err
    assert not (tmp_path / "maps2").exists()


def test_fewshot_fits_a_head_on_a_space_ranger_folder(predict_setup, space_ranger, tmp_path, capsys):
    from stalign.data.crop_spec import CropSpec
    from stalign.models.factory import save_checkpoint

    model = predict_setup["model"]
    model.crop_spec, old = CropSpec(patch_px=24, spot_um=100, niche_um=200), model.crop_spec
    try:
        ckpt = save_checkpoint(model, tmp_path / "ckpt")  # a model trained on 24-px crops of 100/200 µm
    finally:
        model.crop_spec = old
    head = tmp_path / "head"
    assert main(["fewshot", "--model", str(ckpt), "--spaceranger", str(space_ranger["folder"]),
                 "--out", str(head), "--latent-dim", "4", "--folds", "3", "--workers", "0", "--quiet"]) == 0
    manifest = json.loads((head / "shards" / "manifest.json").read_text())
    assert manifest["genes"] == list(model.genes)
    assert (manifest["patch_px"], manifest["spot_um"], manifest["niche_um"]) == (24, 100, 200)  # the model's crops
    assert manifest["slides"][0]["n_spots"] == 49 and (head / "head.json").is_file()
    assert "49 spots x 20 genes of sr" in capsys.readouterr().out
    assert main(["fewshot", "--model", str(predict_setup["ckpt"]), "--slide", str(tmp_path / "x.jpg"),
                 "--out", str(tmp_path / "h2")]) == 1
    err = capsys.readouterr().err
    assert "an image alone has no expression" in err and not (tmp_path / "h2").exists()


@pytest.mark.parametrize("inputs, words", [
    (["--spaceranger", "{t}/no_such_run"], ["no_such_run", "Space Ranger folder does not exist"]),
    (["--hest", "{t}/no_hest", "S1"], ["no_hest", "HEST-1k folder does not exist"]),
    (["--h5ad", "{t}/no.h5ad", "--image", "{t}/no.jpg"], ["no.h5ad", "does not exist"]),
    (["--h5ad", "{t}/no.h5ad"], ["--h5ad", "needs --image"]),
    (["--visium-hd", "{t}/no_hd"], ["no_hd", "Visium HD folder does not exist"]),
    (["--spaceranger", "{t}", "--coords", "{t}/c.csv"], ["--coords goes with --slide"]),
    (["--slide", "{t}/x.jpg", "--bin-um", "8"], ["--bin-um 8 goes with --visium-hd"]),
    (["--slide", "{t}/x.jpg", "--pixel-size-from", "grid"], ["--pixel-size-from grid goes with --spaceranger"]),
    (["--spaceranger", "{sr}", "--pixel-size-from", "nonsense"], ["sr", "pixel_size_from='nonsense'", "grid"]),
])
def test_bad_input_is_one_line_and_nothing_is_written(predict_setup, space_ranger, tmp_path, capsys, inputs, words):
    out = tmp_path / "out" / "pred.h5ad"
    argv = [a.format(t=tmp_path, sr=space_ranger["folder"]) for a in inputs]
    assert main(predict_argv(predict_setup, out, *argv)) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("stalign predict: error:"), err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()
