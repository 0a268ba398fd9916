"""Macenko stain normalisation (stalign.data.stain): torchstain's output crop by crop, known stain vectors recovered,
a crop normalised to its own target nearly unchanged, two stainings brought together; recorded in the crop spec,
applied by the one crop reader at prep and predict, carried into checkpoints."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from stalign.data.crop_spec import CropSpec, CropSpecError, read_crop_pairs
from stalign.data.stain import StainError, fit_target, normalize

# Ruifrok & Johnston's H and E optical-density vectors, and a second lab's (bluer H, pinker E)
H1, E1 = np.array([0.650, 0.704, 0.286]), np.array([0.072, 0.990, 0.105])
H2, E2 = np.array([0.50, 0.80, 0.33]), np.array([0.20, 0.95, 0.24])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _tiles(seed: int, h: np.ndarray, e: np.ndarray, *, n: int = 6, px: int = 48, scale: float = 1.0) -> np.ndarray:
    """n synthetic H&E crops: gamma-distributed H and E concentrations, 20% unstained background, sensor noise."""
    rng = np.random.default_rng(seed)
    conc = np.stack([rng.gamma(2.0, 0.4, (n, px, px)), rng.gamma(2.0, 0.3, (n, px, px))], -1) * scale
    conc[rng.random((n, px, px)) < 0.2] = 0.01
    od = conc @ np.stack([_unit(h), _unit(e)])
    return np.clip(240 * np.exp(-od) - 1 + rng.normal(0, 1, od.shape), 0, 255).astype(np.uint8)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(_unit(a) @ _unit(b), -1, 1))))


def test_matches_torchstain_crop_by_crop():
    macenko = pytest.importorskip("torchstain.numpy.normalizers.macenko")
    ref = macenko.NumpyMacenkoNormalizer()
    target = _tiles(0, H1, E1, n=1)[0]
    ref.fit(target)
    matrix, max_conc = fit_target(target)
    np.testing.assert_allclose(matrix, ref.HERef, atol=1e-9)
    np.testing.assert_allclose(max_conc, ref.maxCRef, atol=1e-9)
    crops = np.concatenate([_tiles(1, H2, E2, n=3, scale=1.4), _tiles(2, H1, E1, n=2, scale=0.7)])
    ours = normalize(crops, matrix, max_conc)
    for crop, mine in zip(crops, ours):
        theirs = ref.normalize(crop, stains=False)[0]
        assert np.abs(theirs.astype(int) - mine.astype(int)).max() <= 1


def test_recovers_known_stain_vectors_within_a_few_degrees():
    matrix, _ = fit_target(_tiles(3, H2, E2, n=4))
    assert _angle(matrix[:, 0], H2) < 4 and _angle(matrix[:, 1], E2) < 4  # haematoxylin first
    assert _angle(matrix[:, 0], H1) > 8  # and not the other lab's


def test_own_target_is_nearly_identity_and_background_is_untouched():
    crops = _tiles(4, H1, E1, n=4)
    matrix, max_conc = fit_target(crops[0])
    same = normalize(crops[:1], matrix, max_conc)
    assert np.abs(same.astype(int) - crops[:1].astype(int)).mean() < 1.0
    blank = np.full((2, 32, 32, 3), 236, np.uint8)  # no stained pixel: left as it is
    assert np.array_equal(normalize(blank, matrix, max_conc), blank)
    with pytest.raises(StainError, match="stained"):
        fit_target(blank)


def test_two_stainings_become_closer_in_colour():
    a, b = _tiles(5, H1, E1, n=4), _tiles(6, H2, E2, n=4, scale=1.5)
    matrix, max_conc = fit_target(a)

    def stats(x: np.ndarray) -> np.ndarray:
        return np.concatenate([x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)])

    before = np.abs(stats(a) - stats(b)).mean()
    after = np.abs(stats(normalize(a, matrix, max_conc)) - stats(normalize(b, matrix, max_conc))).mean()
    assert after < before / 3, (before, after)


def test_spec_records_the_target_and_reads_old_records_as_none():
    matrix, max_conc = fit_target(_tiles(7, H1, E1, n=1))
    spec = CropSpec(patch_px=32, stain_norm="Macenko", stain_matrix=matrix, stain_max=max_conc)
    assert spec.stain_norm == "macenko" and spec.stain_target == "auto"
    assert CropSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert "stain_norm" not in CropSpec().to_dict()  # unnormalised records keep their keys
    assert CropSpec.from_dict({"spot_um": 112, "niche_um": 336, "patch_px": 224}).stain_norm == "none"
    assert spec.with_overrides(stain_target="s1").stain_matrix is None  # another target: fitted again
    assert spec.with_overrides(stain_norm="none") == CropSpec(patch_px=32)
    assert "macenko" in str(spec) and any("stain_norm" in d for d in spec.differences(CropSpec(patch_px=32)))
    for bad in ({"stain_norm": "vahadane"}, {"stain_norm": "macenko", "stain_matrix": matrix},
                {"stain_norm": "macenko", "stain_matrix": [[1, 2]], "stain_max": [1, 1]},
                {"stain_norm": "macenko", "stain_matrix": matrix, "stain_max": [0, 1]}):
        with pytest.raises(CropSpecError):
            CropSpec(**bad)


def test_prep_fits_the_target_and_the_reader_normalises_alike(tmp_path, squidpy_crop):
    """`stalign prep --stain-norm macenko`: the manifest records the fitted target, the shards hold the crops the
    one reader cuts with that spec (what predict cuts, with the model's spec), a re-run resumes and another stain
    setting is refused; a bank of other stain settings than the query's is refused."""
    import h5py

    from stalign.cli import main
    from stalign.data.slide import open_slide
    from stalign.tasks.predict import settle_crop

    out = tmp_path / "shards"
    args = ["prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
            "--out", str(out), "--n-top-genes", "8", "--patch-px", "24", "--quiet"]
    assert main([*args, "--stain-norm", "macenko", "--stain-target", "auto"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    spec = CropSpec.from_dict(manifest)
    assert spec.stain_norm == "macenko" and np.asarray(spec.stain_matrix).shape == (3, 2)
    assert _angle(np.asarray(spec.stain_matrix)[:, 0], H1) < 25  # a real H&E's haematoxylin
    with h5py.File(out / manifest["slides"][0]["shard"]) as f:
        stored, coords = f["spot_patches"][:6], f["coords_px"][:6]
    slide = open_slide(squidpy_crop / "test_img.jpg", um_per_px=manifest["slides"][0]["um_per_px"])
    spot = read_crop_pairs(slide, coords, spec)[0]
    raw = read_crop_pairs(slide, coords, spec.with_overrides(stain_norm="none"))[0]
    assert np.array_equal(stored, spot) and not np.array_equal(spot, raw)
    assert main([*args, "--stain-norm", "macenko"]) == 0  # the folder's target is kept: resumes
    assert main([*args, "--stain-norm", "none"]) == 1  # other crops than the folder's

    # predict takes the model's (checkpoint's: CropSpec.from_dict of config.json "crop") or the bank's spec
    model = SimpleNamespace(crop_spec=CropSpec.from_dict(json.loads(json.dumps({"crop": spec.to_dict()}))["crop"]))
    assert settle_crop(model) == spec and settle_crop(model, crop={"resample": "lanczos"}).stain_matrix is not None
    with pytest.raises(CropSpecError, match="not be comparable"):  # a bank of normalised crops, plain query crops
        settle_crop(model, bank=SimpleNamespace(info=spec.to_dict()), crop=spec.with_overrides(stain_norm="none"))


def test_an_unfitted_spec_is_refused_by_the_reader(squidpy_crop):
    from stalign.data.slide import open_slide

    slide = open_slide(squidpy_crop / "test_img.jpg", um_per_px=1.0)
    with pytest.raises(CropSpecError, match="not fitted"):
        read_crop_pairs(slide, np.array([[100.0, 100.0]]), CropSpec(patch_px=16, stain_norm="macenko"))
