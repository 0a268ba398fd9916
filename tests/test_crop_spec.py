"""The crop spec: one record of the crops a model was trained on, from the shards' manifest into the checkpoint,
read back by predict (a few-shot head alone cuts the model's crops); a reference bank of other crops is warned
about, other query crop sizes than the bank's are refused."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from stalign.data.crop_spec import CropSpec, CropSpecError, CropSpecWarning

TINY = "configs/tiny_test.yaml"
#: Not the defaults in any setting, so a fall-back to a default shows.
TRAINED = CropSpec(spot_um=100.0, niche_um=300.0, patch_px=32, resample="lanczos")


def test_spec_checks_its_values_and_reads_old_records_as_lanczos():
    assert CropSpec() == CropSpec(112.0, 336.0, 224, "bilinear")
    assert CropSpec(spot_um=100, niche_um=300, patch_px=32.0, resample="LANCZOS") == TRAINED
    for bad in ({"spot_um": 0}, {"niche_um": float("nan")}, {"patch_px": 0}, {"patch_px": 31.5},
                {"resample": "bicubic"}, {"spot_um": "wide"}):
        with pytest.raises(CropSpecError):
            CropSpec(**bad)
    assert CropSpec.from_dict(TRAINED.to_dict()) == TRAINED
    assert CropSpec.from_dict({"spot_um": 112, "niche_um": 336, "patch_px": 224}).resample == "lanczos"  # old shards
    assert CropSpec.from_dict({}) is None and CropSpec.from_dict({"spot_um": 112}) is None
    assert TRAINED.with_overrides(resample=None, patch_px=64) == CropSpec(100.0, 300.0, 64, "lanczos")
    assert TRAINED.pixels(0.5) == (200.0, 600.0)
    assert "patch_px 32 vs 224" in "; ".join(TRAINED.differences(CropSpec()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, squidpy_crop):
    """The real crop prepared with TRAINED crops (through `stalign prep`'s flags; predict_setup's gene panel) and a
    model trained on it."""
    from stalign.cli import main
    from stalign.training.trainer import train_from_config

    root = tmp_path_factory.mktemp("crop_spec")
    shards = root / "shards"
    assert main(["prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
                 "--out", str(shards), "--n-top-genes", "20", "--spot-um", "100", "--niche-um", "300",
                 "--patch-px", "32", "--resample", "lanczos", "--quiet"]) == 0
    result = train_from_config(TINY, data=str(shards), output_dir=str(root / "run"), max_steps=2)
    manifest = json.loads((shards / "manifest.json").read_text())
    return {"root": root, "shards": shards, "ckpt": result.checkpoint, "manifest": manifest,
            "image": squidpy_crop / "test_img.jpg", "um_per_px": manifest["slides"][0]["um_per_px"]}


def test_checkpoint_carries_the_crops_of_its_shards(trained):
    import stalign

    assert CropSpec.from_dict(trained["manifest"]) == TRAINED
    assert json.loads((trained["ckpt"] / "config.json").read_text())["crop"] == TRAINED.to_dict()
    assert stalign.load_checkpoint(trained["ckpt"]).crop_spec == TRAINED


def test_predict_with_a_head_alone_cuts_the_crops_the_model_was_trained_on(trained, tmp_path):
    """A head that records no crops (fitted on embeddings in a notebook): predict takes the checkpoint's crops,
    not a default; the embeddings are those of TRAINED crops of the slide."""
    import anndata as ad

    import stalign
    from stalign.cli import main
    from stalign.data.slide import open_slide
    from stalign.tasks.embed import SlideCrops, embed_slide_crops
    from stalign.tasks.fewshot import ExpressionProbe
    from stalign.tasks.fewshot_io import save_head

    model = stalign.load_checkpoint(trained["ckpt"])
    rng = np.random.default_rng(0)
    head = ExpressionProbe(genes=model.genes, latent_dim=4).fit(
        rng.normal(size=(30, model.config.embed_dim)).astype(np.float32), rng.gamma(1.0, 1.0, (30, len(model.genes))))
    save_head(head, tmp_path / "head")
    coords = tmp_path / "coords.csv"
    coords.write_text("x,y\n300,500\n600,900\n450,700\n")
    out = tmp_path / "pred.h5ad"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CropSpecWarning)  # nothing to warn about: one source of crops
        assert main(["predict", "--model", str(trained["ckpt"]), "--fewshot-head", str(tmp_path / "head"),
                     "--slide", str(trained["image"]), "--um-per-px", str(trained["um_per_px"]), "--coords",
                     str(coords), "--out", str(out), "--heatmap-genes", "none", "--workers", "0", "--quiet"]) == 0
    pred = ad.read_h5ad(out)
    assert CropSpec.from_dict(pred.uns["stalign"]) == TRAINED
    slide = open_slide(trained["image"], um_per_px=trained["um_per_px"])
    crops = SlideCrops(slide=slide, centers_px=pred.obsm["spatial"], crop=TRAINED)
    np.testing.assert_allclose(pred.obsm["X_stalign"], embed_slide_crops(model, crops, progress=False), atol=1e-6)


def test_a_bank_of_other_crops_is_warned_and_other_query_sizes_are_refused(trained, predict_setup):
    """predict_setup's shards hold 112/336 µm bilinear crops; the model was trained on TRAINED ones."""
    import stalign
    from stalign.tasks.predict import predict_slide

    model = stalign.load_checkpoint(trained["ckpt"])
    assert model.genes == predict_setup["model"].genes
    coords = np.array([[300.0, 500.0], [600.0, 900.0]])
    slide = dict(um_per_px=trained["um_per_px"], coords=coords, workers=0, progress=False)
    with pytest.warns(CropSpecWarning) as seen:
        out = predict_slide(model, predict_setup["image"], reference=predict_setup["shards"], k=5, **slide)
    messages = " | ".join(str(w.message) for w in seen)
    assert "the reference bank was embedded from crops spot 112 µm / niche 336 µm at 32 px, bilinear" in messages
    assert "the model was trained on spot 100 µm / niche 300 µm at 32 px, lanczos" in messages
    assert CropSpec.from_dict(out.uns["stalign"]) == CropSpec(112.0, 336.0, 32, "bilinear")  # the bank's crops
    with pytest.raises(CropSpecError, match="asks for spot 50 µm"):
        predict_slide(model, predict_setup["image"], reference=predict_setup["shards"], crop={"spot_um": 50}, **slide)
    with pytest.warns(CropSpecWarning, match="this prediction asks for crops .* lanczos"):  # a filter: warned only
        out = predict_slide(model, predict_setup["image"], reference=predict_setup["shards"], k=5,
                            crop={"resample": "lanczos"}, **slide)
    assert out.uns["stalign"]["resample"] == "lanczos"
