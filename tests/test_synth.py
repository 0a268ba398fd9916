"""Synthetic slides: a real pyramidal TIFF that openslide reads, integer counts, and a ground truth that holds."""
from __future__ import annotations

import json

import numpy as np
import pytest

from stalign.cli import main
from stalign.lab.synth import make_synthetic_slide
from stalign.lab.synth_expression import covered_fraction
from stalign.lab.synth_texture import dark_fraction
from stofm.util.safe_files import sha256_of

UM_PER_PX = 1.0


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_synthetic_slide(tmp_path_factory.mktemp("synth"), n_spots=200, um_per_px=UM_PER_PX, seed=0,
                                progress=False)


@pytest.fixture(scope="module")
def adata(slide):
    import anndata as ad

    return ad.read_h5ad(slide.paths["adata"])


def spot_discs(slide, adata) -> tuple[np.ndarray, np.ndarray]:
    """Image-measured dark-pixel and white-pixel fractions in each 55 µm spot disc (openslide, level 0)."""
    import openslide

    r = 27.5 / UM_PER_PX
    half = int(np.ceil(r))
    yy, xx = np.mgrid[-half:half + 1, -half:half + 1]
    disc = xx**2 + yy**2 <= r * r
    dark, white = [], []
    with openslide.OpenSlide(str(slide.paths["image"])) as osr:
        for x, y in adata.obsm["spatial"]:
            crop = osr.read_region((round(x) - half, round(y) - half), 0, (2 * half + 1,) * 2)
            rgb = np.asarray(crop.convert("RGB"))[disc]
            dark.append(dark_fraction(rgb))
            white.append(float((rgb.min(axis=1) > 215).mean()))
    return np.array(dark), np.array(white)


def test_openslide_reads_the_pyramid_with_its_pixel_size(slide):
    import openslide

    h, w = slide.truth["level_shapes_hw"][0]
    with openslide.OpenSlide(str(slide.paths["image"])) as osr:
        assert osr.level_count == len(slide.truth["level_shapes_hw"]) > 1
        assert osr.level_dimensions[0] == (w, h)
        assert osr.level_downsamples[1] == pytest.approx(4.0, rel=0.01)
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(UM_PER_PX)
        assert osr.properties["openslide.level[0].tile-width"] == "256"


def test_tiff_resolution_tags_give_um_per_px(slide):
    import tifffile

    with tifffile.TiffFile(slide.paths["image"]) as tif:
        pages = tif.pages
        assert pages[0].is_tiled and pages[0].tilewidth == 256
        assert all(p.subfiletype == 1 for p in pages[1:]) and len(pages) > 1
        num, den = pages[0].tags["XResolution"].value
        assert pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert 1e4 / (num / den) == pytest.approx(UM_PER_PX)
        small = pages[-1].asarray()
        assert small.shape == (*slide.truth["level_shapes_hw"][-1], 3) and small.dtype == np.uint8


def test_counts_are_nonnegative_integers_and_spots_on_the_hex_grid(slide, adata):
    x = adata.X.toarray()
    assert np.issubdtype(x.dtype, np.integer) and x.min() >= 0 and x.sum() > 0
    assert adata.n_obs == 200 and adata.n_vars == len(slide.truth["genes"])
    xy_um = adata.obsm["spatial"] * UM_PER_PX
    d = np.sort(np.hypot(*(xy_um[:, None, :] - xy_um[None, :, :]).transpose(2, 0, 1)), axis=1)[:, 1]
    assert np.allclose(d, 100.0)  # nearest neighbour at the Visium pitch
    # Space Ranger's definitions: spot_diameter_fullres spans a theoretical 65 µm spot; array_col steps of 2 along
    # a row of the hex grid, so the readers' pixel-size sources all give the TIFF's resolution
    assert adata.uns["spatial"]["synth0"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(65 / UM_PER_PX)
    rows, cols = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    assert ((rows + cols) % 2 == 0).all()
    x_um = xy_um[:, 0] - xy_um[:, 0].min()
    assert np.allclose(x_um - x_um.min(), (cols - cols.min()) * 50.0)


def test_class_programmes_differ_by_the_programme_factor(slide, adata):
    factor = slide.truth["programme_factor"]
    on = adata.obs["in_tissue"].to_numpy() == 1
    norm = adata.X.toarray() / adata.obs["size_factor"].to_numpy()[:, None]
    classes = [c["name"] for c in slide.truth["classes"]]
    tested = 0
    for name in classes:
        in_cls = on & (adata.obs["tissue_class"].to_numpy() == name)
        rest = on & ~in_cls
        if in_cls.sum() < 10 or rest.sum() < 10:
            continue
        genes = (adata.var["programme"] == name).to_numpy()
        ratio = norm[in_cls][:, genes].sum(1).mean() / norm[rest][:, genes].sum(1).mean()
        assert ratio == pytest.approx(factor, rel=0.2), name
        hk = (adata.var["programme"] == "housekeeping").to_numpy()
        assert norm[in_cls][:, hk].sum(1).mean() / norm[rest][:, hk].sum(1).mean() == pytest.approx(1, rel=0.1)
        tested += 1
    assert tested >= 2


def test_density_and_hole_genes_follow_the_image(slide, adata):
    on = adata.obs["in_tissue"].to_numpy() == 1
    dark, white = spot_discs(slide, adata)
    x = adata.X.toarray().astype(np.float64)
    logn = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    up = list(adata.var_names).index("density_06")  # beta > 0
    down = list(adata.var_names).index("density_07")  # beta < 0
    assert np.corrcoef(logn[on, up], dark[on])[0, 1] > 0.8
    assert np.corrcoef(logn[on, down], dark[on])[0, 1] < -0.7
    assert np.corrcoef(adata.obs["nuclear_area_fraction"].to_numpy()[on], dark[on])[0, 1] > 0.9
    hk = list(adata.var_names).index("hk_0001")
    assert abs(np.corrcoef(logn[on, hk], dark[on])[0, 1]) < 0.5
    # fat cells / lumina: white pixels inside tissue spots
    assert np.corrcoef(adata.obs["hole_fraction"].to_numpy()[on], white[on])[0, 1] > 0.95
    assert np.corrcoef(logn[on, list(adata.var_names).index("holes_04")], white[on])[0, 1] > 0.8


def test_background_spots_lie_on_glass_and_have_small_libraries(slide, adata):
    import openslide

    on = adata.obs["in_tissue"].to_numpy() == 1
    assert 0 < (~on).sum() < 0.5 * adata.n_obs
    assert (adata.obs.loc[~on, "tissue_class"] == "background").all()
    lib = np.asarray(adata.X.sum(1)).ravel()
    assert np.median(lib[~on]) < 0.1 * np.median(lib[on])
    with openslide.OpenSlide(str(slide.paths["image"])) as osr:
        x, y = adata.obsm["spatial"][np.flatnonzero(~on)[0]]
        glass = np.asarray(osr.read_region((int(x) - 20, int(y) - 20), 0, (40, 40)).convert("RGB"))
        assert glass.mean() > 225 and dark_fraction(glass) == 0.0


def test_truth_json_matches_the_files(slide):
    truth = json.loads(slide.paths["truth"].read_text())
    assert truth["format"] == "stalign-synthetic" and truth["um_per_px"] == UM_PER_PX
    for kind in ("image", "adata"):
        assert truth["files"][kind]["sha256"] == sha256_of(slide.paths[kind])
    assert sum(truth["class_spot_counts"].values()) == truth["n_in_tissue"]


def test_same_seed_same_bytes_other_seed_differs(slide, tmp_path):
    again = make_synthetic_slide(tmp_path / "a", n_spots=200, um_per_px=UM_PER_PX, seed=0, progress=False)
    other = make_synthetic_slide(tmp_path / "b", n_spots=200, um_per_px=UM_PER_PX, seed=1, progress=False)
    for kind in ("image", "adata", "truth"):
        assert sha256_of(again.paths[kind]) == sha256_of(slide.paths[kind])
        assert sha256_of(other.paths[kind]) != sha256_of(slide.paths[kind])
    assert [g["name"] for g in other.truth["genes"]] == [g["name"] for g in slide.truth["genes"]]
    assert [g["base"] for g in other.truth["genes"]] == [g["base"] for g in slide.truth["genes"]]


def test_covered_fraction_matches_known_areas():
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [300.0, 0.0]])
    discs = np.array([[0.0, 0.0], [100.0, 27.5], [1000.0, 0.0], [1000.0, 0.0]])
    got = covered_fraction(centres, 27.5, discs, np.array([50.0, 27.5, 5.0, 5.0]))
    lens = 2 * np.pi / 3 - np.sqrt(3) / 2  # two unit circles one radius apart, in units of r**2
    assert got[0] == 1.0 and got[2] == 0.0
    assert got[1] == pytest.approx(lens / np.pi, abs=0.01)
    twice = covered_fraction(centres[:1], 27.5, np.array([[0.0, 0.0], [0.0, 0.0]]), np.array([10.0, 10.0]))
    assert twice[0] == pytest.approx((10 / 27.5) ** 2, abs=0.02)  # a union, not a sum


@pytest.mark.parametrize("kwargs, message", [
    ({"n_spots": 0}, "n_spots"), ({"n_genes": 20}, "n_genes=20 is too small"),
    ({"n_classes": 9}, "n_classes"), ({"um_per_px": 0.0}, "um_per_px"),
])
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_slide(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())


def test_cli_writes_several_slides(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--n-spots", "30", "--um-per-px", "2", "--slides", "2",
                 "--seed", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    for sid in ("synth5", "synth6"):
        assert sid in out
        for suffix in (".tif", ".h5ad", ".truth.json"):
            assert (tmp_path / f"{sid}{suffix}").exists()
    assert not list(tmp_path.glob(".*.tmp*")) and not list(tmp_path.glob(".synth-*"))  # no temporaries left


def test_ensure_reuses_an_intact_slide_and_remakes_a_changed_one(slide):
    from stalign.lab.synth import ensure_synthetic_slide, load_synthetic_slide

    folder = slide.paths["image"].parent
    mtime = slide.paths["image"].stat().st_mtime_ns
    again = ensure_synthetic_slide(folder, n_spots=200, um_per_px=UM_PER_PX, seed=0, progress=False)
    assert again.paths["image"].stat().st_mtime_ns == mtime and again.truth == slide.truth
    with open(slide.paths["adata"], "r+b") as fh:  # corrupt one byte in the middle
        middle = fh.seek(0, 2) // 2
        fh.seek(middle)
        old = fh.read(1)
        fh.seek(middle)
        fh.write(bytes([old[0] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256 differs"):
        load_synthetic_slide(folder, "synth0")
    remade = ensure_synthetic_slide(folder, n_spots=200, um_per_px=UM_PER_PX, seed=0, progress=False)
    assert sha256_of(remade.paths["adata"]) == slide.truth["files"]["adata"]["sha256"]
