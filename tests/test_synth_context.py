"""Synth v2: spatial domains and context-driven genes whose drivers lie in the neighbourhood, not in the spot;
v1 stays byte-identical; the truth reads back (``truth_of``) from the h5ad and from prepared shards."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from stalign.cli import main
from stalign.lab.synth import make_synthetic_slide
from stalign.lab.synth_truth import log_normalised, truth_of
from stofm.util.safe_files import sha256_of

UM_PER_PX = 2.0
# v1 slide (n_spots=120, um_per_px=2, seed=3) as written by the generator before v2 existed: file sha256 and the
# sha256 of the decoded level-0 pixels / counts (int32 little-endian) / obs as CSV.
# The TIFF's deflate bytes (and truth.json, which records the TIFF's sha256) depend on the zlib tifffile uses
# (imagecodecs' when installed, else Python's): its decoded pixels are pinned instead, the h5ad's bytes as written.
V1_FILES = {"adata": "b461c687adc231300789212df781721daff5c431b4ccb7f63da006de660e5a15"}
V1_CONTENT = {"pixels": "bd5f0aeccc479eee0dadefb525927d50ea110b48cca9e99e06ccc776cb623f3d",
              "counts": "6780ceb93e703c745f001a77b4f5e96e488b697916044ac570bd7c2a3d049495",
              "obs_csv": "0cf28d8f5f10347477b66c0a2894ba7bef4af6496380410a7a17f9ab6cc85a6e"}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return make_synthetic_slide(tmp_path_factory.mktemp("synth2"), n_spots=500, um_per_px=UM_PER_PX, seed=0,
                                progress=False)


@pytest.fixture(scope="module")
def adata(slide):
    import anndata as ad

    return ad.read_h5ad(slide.paths["adata"])


@pytest.fixture(scope="module")
def tissue(adata):
    on = adata.obs["in_tissue"].to_numpy() == 1
    return adata[on].copy(), log_normalised(adata)[on]


def _r(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, float), np.asarray(b, float))[0, 1])


def _residual(y, x) -> np.ndarray:
    design = np.column_stack([np.ones(len(x)), x])
    return y - design @ np.linalg.lstsq(design, y, rcond=None)[0]


def test_v2_is_the_default_and_records_its_truth(slide, adata):
    assert slide.truth["version"] == 2 and int(adata.uns["synthetic"]["version"]) == 2
    for col in ("domain", "domain_idx", "comp300_immune", "boundary_distance_um", "gradient", "ligand_activity",
                "ligand_score", "vessels_in_context"):
        assert col in adata.obs, col
    assert set(adata.var["driver"]) == {"spot", "context", "none"}
    assert set(adata.var.loc[adata.var["driver"] == "context", "programme"]) == {
        "composition", "boundary", "gradient", "receptor", "domain"}
    assert {"class", "density", "holes", "ligand"} <= {
        "class" if p in [c["name"] for c in slide.truth["classes"]] else p
        for p in adata.var.loc[adata.var["driver"] == "spot", "programme"]}
    spots = slide.truth["spots"]
    assert spots["barcode"] == list(adata.obs_names) and spots["domain"] == list(adata.obs["domain"].astype(str))
    assert np.allclose(spots["gradient"], adata.obs["gradient"], atol=1e-6)
    assert [d["name"] for d in slide.truth["context"]["domains"]] == list(adata.obs["domain"].cat.categories[:-1])


def test_v1_is_byte_identical_to_the_original_generator(tmp_path):
    import anndata as ad
    import tifffile

    s = make_synthetic_slide(tmp_path, n_spots=120, um_per_px=2.0, seed=3, version=1, progress=False)
    a = ad.read_h5ad(s.paths["adata"])
    with tifffile.TiffFile(s.paths["image"]) as t:
        pixels = np.ascontiguousarray(t.pages[0].asarray())
    content = {"pixels": pixels.tobytes(), "counts": a.X.toarray().astype("<i4").tobytes(),
               "obs_csv": a.obs.to_csv().encode()}
    assert {k: hashlib.sha256(v).hexdigest() for k, v in content.items()} == V1_CONTENT
    assert {k: sha256_of(s.paths[k]) for k in V1_FILES} == V1_FILES
    assert s.truth["files"]["image"]["sha256"] == sha256_of(s.paths["image"])  # the truth names the TIFF it wrote
    assert "domain" not in a.obs and "driver" not in a.var and s.truth["version"] == 1


def test_domains_are_labelled_coherent_and_drawn_as_class_mixtures(slide, tissue):
    from scipy.spatial import cKDTree

    t, _ = tissue
    names = [d["name"] for d in slide.truth["context"]["domains"]]
    dom = t.obs["domain"].astype(str).to_numpy()
    assert set(dom) <= set(names) and len(set(dom)) >= 3
    xy = t.obsm["spatial"] * UM_PER_PX
    pairs = cKDTree(xy).query_pairs(110.0, output_type="ndarray")
    same = float((dom[pairs[:, 0]] == dom[pairs[:, 1]]).mean())
    shares = np.unique(dom, return_counts=True)[1] / len(dom)
    assert same > 0.8 and same > float((shares**2).sum()) + 0.3  # neighbours agree far beyond chance
    for d in slide.truth["context"]["domains"]:
        cls = t.obs["tissue_class"].astype(str).to_numpy()[dom == d["name"]]
        if len(cls) >= 20:
            assert (cls == d["dominant"]).mean() > 0.5, d["name"]


def test_context_genes_follow_their_drivers_not_the_spot_class(tissue):
    t, logx = tissue
    cls = t.obs["tissue_class_idx"].to_numpy()
    onehot = (cls[:, None] == np.arange(cls.max() + 1)[None, :]).astype(float)
    checked = set()
    for g in np.flatnonzero((t.var["driver"] == "context").to_numpy()):
        var = t.var["driver_variable"].iloc[g]
        if var.startswith("domain=="):
            driver = (t.obs["domain"].astype(str) == var[len("domain=="):]).to_numpy(float)
        else:
            driver = t.obs[var].to_numpy(float)
        if driver.std() < 1e-6 or (var.startswith("domain==") and driver.mean() < 0.1):
            continue
        r = _r(logx[:, g], driver)
        assert r * np.sign(t.var["context_coef"].iloc[g]) > 0.45, (t.var_names[g], r)
        # given the driver, the spot's own class adds nothing (the gene has no class term)
        resid = _residual(logx[:, g], driver)
        assert max(abs(_r(resid, onehot[:, k])) for k in range(onehot.shape[1])) < 0.2, t.var_names[g]
        checked.add(t.var["programme"].iloc[g])
    assert checked == {"composition", "boundary", "gradient", "receptor", "domain"}


def test_receptor_follows_the_ligand_of_the_neighbours(adata):
    from scipy.spatial import cKDTree

    logx = log_normalised(adata)
    on = adata.obs["in_tissue"].to_numpy() == 1
    lig = logx[:, list(adata.var_names).index("ligand_02")]
    rec = logx[:, list(adata.var_names).index("receptor_02")]
    xy = adata.obsm["spatial"] * UM_PER_PX
    pairs = cKDTree(xy).query_pairs(110.0, output_type="ndarray")
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    keep = on[j]  # measured ligand of the tissue neighbours
    n = np.bincount(i[keep], minlength=len(xy))
    nb_lig = np.bincount(i[keep], weights=lig[j[keep]], minlength=len(xy)) / np.maximum(n, 1)
    sel = on & (n >= 3)
    assert _r(rec[sel], nb_lig[sel]) > 0.5
    assert _r(rec[sel], nb_lig[sel]) > abs(_r(rec[sel], lig[sel])) + 0.2  # the neighbours', not its own


def test_the_context_shows_in_a_niche_crop_not_in_the_spot(slide, adata, tissue):
    import openslide

    t, _ = tissue
    mixtures = np.array([d["mixture"] for d in slide.truth["context"]["domains"]])
    dom = t.obs["domain_idx"].to_numpy()
    from_spot = mixtures[:, t.obs["tissue_class_idx"].to_numpy()].argmax(axis=0)  # most likely domain of the class
    comp = t.obs[[f"comp300_{c['name']}" for c in slide.truth["classes"]]].to_numpy()
    from_niche = np.abs(comp[:, None, :] - mixtures[None]).sum(-1).argmin(axis=1)
    assert (from_niche == dom).mean() > (from_spot == dom).mean() + 0.1
    # the gradient: capillaries (dense eosin, deep magenta pixels) counted in a niche crop vs in the spot disc
    on = adata.obs["in_tissue"].to_numpy() == 1
    niche, spot = [], []
    half, r = int(168 / UM_PER_PX), int(27.5 / UM_PER_PX)
    with openslide.OpenSlide(str(slide.paths["image"])) as osr:
        for x, y in adata.obsm["spatial"][on]:
            rgb = np.asarray(osr.read_region((int(x) - half, int(y) - half), 0, (2 * half,) * 2).convert("RGB"))
            red = (rgb[..., 1] < 50) & (rgb[..., 0] > 150)
            niche.append(red.mean())
            spot.append(red[half - r:half + r, half - r:half + r].mean())
    g = adata.obs["gradient"].to_numpy()[on]
    assert _r(niche, g) > 0.45 and _r(niche, g) > _r(spot, g) + 0.2


def test_same_seed_same_bytes(slide, tmp_path):
    again = make_synthetic_slide(tmp_path, n_spots=500, um_per_px=UM_PER_PX, seed=0, progress=False)
    for kind in ("image", "adata", "truth"):
        assert sha256_of(again.paths[kind]) == sha256_of(slide.paths[kind])


def test_prep_reads_v2_and_truth_of_maps_shards_to_domains(slide, tmp_path):
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.data.shards import read_shard

    sample = read_anndata_image(slide.paths["adata"], slide.paths["image"])
    manifest = prepare([sample], tmp_path / "shards", n_top_genes=64, crop=CropSpec(patch_px=32), progress=False)
    truth = truth_of(tmp_path / "shards")
    assert truth.version == 2 and truth.genes == manifest["genes"]
    assert set(truth.spot_genes) | set(truth.context_genes) | set(truth.housekeeping_genes) == set(truth.genes)
    assert truth.context_genes and truth.spot_genes
    shard = read_shard(tmp_path / "shards" / manifest["slides"][0]["shard"])
    labels = truth.domains(slide.slide_id)
    assert len(labels) == len(shard["barcodes"]) and set(labels) <= {*truth.domain_names, "background"}
    whole = truth_of(slide.paths["adata"])
    assert len(whole.context_genes) == 26 and whole.domain_names == truth.domain_names
    idx = [list(whole.spots[slide.slide_id].index).index(b) for b in shard["barcodes"]]
    assert list(whole.domains(slide.slide_id)[idx]) == list(labels)


def test_truth_of_refuses_v1_and_other_folders(tmp_path):
    s = make_synthetic_slide(tmp_path, n_spots=30, um_per_px=4.0, seed=1, version=1, progress=False)
    with pytest.raises(ValueError, match="synth v1, which has no context ground truth"):
        truth_of(s.paths["adata"])
    with pytest.raises(ValueError, match="neither a synthetic .h5ad nor a stalign prep folder"):
        truth_of(tmp_path)


def test_cli_version_flag_and_report(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "v1"), "--n-spots", "40", "--um-per-px", "4",
                 "--version", "1", "--quiet"]) == 0
    assert json.loads((tmp_path / "v1" / "synth0.truth.json").read_text())["version"] == 1
    assert main(["data", "synth", "--out", str(tmp_path / "v2"), "--n-spots", "80", "--um-per-px", "4",
                 "--domains", "islands", "--n-domains", "3", "--report", "--quiet"]) == 0
    out = capsys.readouterr().out
    truth = json.loads((tmp_path / "v2" / "synth0.truth.json").read_text())
    assert truth["version"] == 2 and truth["context"]["domain_layout"] == "islands"
    assert len(truth["context"]["domains"]) == 3
    assert "v2 (islands)" in out and "46 spot-driven, 24 context-driven" in out
    for row in ("| composition | context |", "| boundary | context |", "| receptor | context |",
                "| density | spot |", "| domain (accuracy) |"):
        assert row in out, row


@pytest.mark.parametrize("kwargs, message", [
    ({"version": 4}, "version must be one of"), ({"n_domains": 1}, "n_domains must lie in"),
    ({"domain_layout": "rings"}, "domain_layout must be one of"), ({"n_classes": 1}, "n_classes >= 2"),
    ({"n_genes": 60}, "n_genes=60 is too small"),
])
def test_bad_v2_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_synthetic_slide(tmp_path, progress=False, **kwargs)
    assert not any(tmp_path.iterdir())
