"""Synth v3: classes that share their mean stain and differ in morphology, seen through per-site and per-slide
stain drawn from the documented ranges; slides carry their site; v2 stays as it was; the site measures run."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from stalign.lab.synth import make_synthetic_sites, make_synthetic_slide
from stalign.lab.synth_stain import (
    BLUR_PX_RANGE,
    JPEG_QUALITY_RANGE,
    SITE_ANGLE_DEG,
    SITE_SCALE,
    SLIDE_ANGLE_DEG,
    SLIDE_SCALE,
    WHITE_RANGE,
    site_stain,
)
from stalign.lab.synth_texture import EOSIN_OD, GLASS_OD, HAEMATOXYLIN_OD

# synth v2 (n_spots=40, um_per_px=4, seed=3) before v3 existed: sha256 of the decoded level-0 pixels and of the
# counts (int32 little-endian)
V2_PIXELS = "1b763493c1cbb32cc07ee4ec89bd94d3dd7a7f832c851d0d623d7cc113c8fd55"
V2_COUNTS = "d00cb4f21f261bfcf2f7655818d4d6d26cc19e4ede8d460e0f2a758ab499926a"


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    return make_synthetic_sites(tmp_path_factory.mktemp("v3"), n_sites=3, slides_per_site=1, n_spots=100,
                                um_per_px=2.0, progress=False)


def _angle(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_v2_is_unchanged(tmp_path):
    import anndata as ad
    import tifffile

    s = make_synthetic_slide(tmp_path, n_spots=40, um_per_px=4.0, seed=3, progress=False)
    assert hashlib.sha256(tifffile.imread(s.paths["image"]).tobytes()).hexdigest() == V2_PIXELS
    counts = ad.read_h5ad(s.paths["adata"]).X.toarray().astype("<i4")
    assert hashlib.sha256(counts.tobytes()).hexdigest() == V2_COUNTS


def test_slides_carry_site_and_slide_ids(sites):
    import anndata as ad

    assert [s.slide_id for s in sites] == ["site0_slide0", "site1_slide0", "site2_slide0"]
    for i, s in enumerate(sites):
        a = ad.read_h5ad(s.paths["adata"])
        assert s.truth["version"] == 3 and s.truth["site"] == f"site{i}" and s.truth["slide"] == s.slide_id
        assert set(a.obs["site"]) == {f"site{i}"} and set(a.obs["slide"]) == {s.slide_id}
        assert a.uns["synthetic"]["site"] == f"site{i}" and "stain" in a.uns["synthetic"]
        assert {"driver", "driver_variable"} <= set(a.var) and "domain" in a.obs  # v2's genes on top
        assert [c["arrangement"] for c in s.truth["classes"]] == ["scatter", "scatter", "scatter", "rosette"]


def test_stain_is_drawn_per_site_and_per_slide_within_the_documented_ranges(tmp_path):
    slides = make_synthetic_sites(tmp_path, n_sites=2, slides_per_site=2, n_spots=40, um_per_px=4.0, progress=False)
    by_site = {}
    for s in slides:
        st = s.truth["stain"]
        by_site.setdefault(s.truth["site"], []).append(st)
        site, slide = st["site"], st["slide"]
        assert site == site_stain(int(s.truth["site"][4:])).record()  # the site's look depends on the site alone
        assert _angle(site["haematoxylin_od"], HAEMATOXYLIN_OD) <= SITE_ANGLE_DEG + 1e-3
        assert _angle(site["eosin_od"], EOSIN_OD) <= SITE_ANGLE_DEG + 1
        assert _angle(slide["haematoxylin_od"], site["haematoxylin_od"]) <= SLIDE_ANGLE_DEG + 1e-3
        for k in ("h_scale", "e_scale"):
            assert 1 - SITE_SCALE <= site[k] <= 1 + SITE_SCALE
            assert 1 - SLIDE_SCALE <= slide[k] / site[k] <= 1 + SLIDE_SCALE
        assert all(255 * WHITE_RANGE[0] <= w <= 255 * WHITE_RANGE[1] for w in site["white"])
        assert BLUR_PX_RANGE[0] <= site["blur_px"] <= BLUR_PX_RANGE[1]
        assert JPEG_QUALITY_RANGE[0] <= slide["jpeg_quality"] == site["jpeg_quality"] <= JPEG_QUALITY_RANGE[1]
    (a0, a1), (b0, _) = by_site["site0"], by_site["site1"]
    assert a0["site"] == a1["site"] and a0["slide"] != a1["slide"] and a0["site"] != b0["site"]


def test_the_glass_shows_the_slides_white_level(sites):
    import tifffile

    for s in sites:
        img = tifffile.imread(s.paths["image"], level=0).astype(float)
        glass = img[:40, :40].reshape(-1, 3).mean(0)  # the margin is glass
        expected = np.array(s.truth["stain"]["slide"]["white"]) * np.exp(-GLASS_OD)
        assert np.abs(glass - expected).max() < 4.0, (glass, expected)


def _class_crops(slide, k: int, *, pure: bool):
    """55 µm crops of the tissue spots of class ``k`` (``pure``: only where the 300 µm disc is > 60 % that class)."""
    import anndata as ad
    import tifffile

    a = ad.read_h5ad(slide.paths["adata"])
    img = tifffile.imread(slide.paths["image"], level=0)
    half = int(27 / slide.um_per_px)
    sel = (a.obs["tissue_class_idx"].to_numpy() == k) & (a.obs["in_tissue"].to_numpy() == 1)
    if pure:
        sel &= a.obs["comp300_" + a.uns["synthetic"]["classes"][k]].to_numpy() > 0.6
    xy = np.round(a.obsm["spatial"][sel]).astype(int)
    return [img[y - half:y + half, x - half:x + half] for x, y in xy]


def _od(c: np.ndarray) -> np.ndarray:
    return -np.log(np.clip(np.asarray(c, float) / 255.0, 1 / 255, 1))


def test_classes_share_their_mean_colour_but_not_their_morphology(sites):
    """On each slide the mean optical density of the classes' spots agrees within 0.08 (synth v2's classes differ by
    ~0.4, docs/synth.md); the nuclei (blobs of the darkest fifth of the smoothed OD) differ: tumour ones are larger
    and fewer than immune ones."""
    from scipy import ndimage

    size, count = {}, {}
    for s in sites:
        means = [np.concatenate([_od(c).reshape(-1, 3) for c in crops]).mean(0)
                 for crops in (_class_crops(s, k, pure=False) for k in range(4)) if len(crops) >= 5]
        assert len(means) >= 2 and np.ptp(np.stack(means), axis=0).max() < 0.08, (s.slide_id, means)
        for k, name in ((0, "tumour"), (2, "immune")):
            for c in _class_crops(s, k, pure=True):
                od = ndimage.gaussian_filter(_od(c).sum(-1), 1.0)
                lab, n = ndimage.label(od > np.percentile(od, 80))
                size.setdefault(name, []).extend(np.bincount(lab.ravel())[1:])
                count.setdefault(name, []).append(n)
    assert np.mean(size["tumour"]) > 1.4 * np.mean(size["immune"]), size
    assert np.mean(count["immune"]) > 1.3 * np.mean(count["tumour"]), count


def test_site_report_colour_vs_true_morphology(sites):
    import pandas as pd

    from stalign.lab.synth_sites import PREDICTORS, SPLITS, site_scores, site_table, slide_data

    data = [slide_data(s) for s in sites]
    rows = site_scores(data)
    df = pd.DataFrame(rows)
    assert set(df["split"]) == {SPLITS[0], SPLITS[2]}  # one slide per site: no "other slide, same site"
    unseen = df[(df.split == SPLITS[2]) & (df.genes == "spot")].groupby("predictor")["r"].mean()
    assert unseen[PREDICTORS[1]] > unseen[PREDICTORS[0]] + 0.2  # the truth explains what colour cannot
    text = site_table(rows, data)
    assert len([line for line in text.splitlines() if line.startswith("| ")]) == 5 and "| – |" in text


def test_cli_makes_a_multi_site_set_and_refuses_sites_without_v3(tmp_path, capsys):
    from stalign.cli import main

    assert main(["data", "synth", "--out", str(tmp_path), "--version", "3", "--sites", "2", "--slides-per-site",
                 "1", "--n-spots", "30", "--um-per-px", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "site0_slide0" in out and "site1_slide0" in out and "v3 site1: stain scale" in out
    assert main(["data", "synth", "--out", str(tmp_path), "--sites", "2"]) == 1
    assert "need --version 3" in capsys.readouterr().err
