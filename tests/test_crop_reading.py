"""Whole-slide crop reading for prediction: the one crop reader (read_crop_pairs, also prep's) gives read_crop's
crops bit for bit, reader threads give the serial embeddings and predictions, and the reading plan follows the
device and cores."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stalign.data.crop_spec import CropSpec, CropSpecError, read_crop_pairs
from stalign.data.slide import resample_filter
from stalign.tasks.crop_reading import SlideCrops, reading_plan


@pytest.fixture(scope="module")
def slides(squidpy_crop, tmp_path_factory):
    """The real H&E crop as a plain JPEG (one level) and as a 3-level pyramidal TIFF read through openslide."""
    from PIL import Image

    from stalign.data.slide import open_slide, write_pyramidal_tiff

    jpg = squidpy_crop / "test_img.jpg"
    tif = write_pyramidal_tiff(tmp_path_factory.mktemp("crops") / "crop.tif", np.asarray(Image.open(jpg)),
                               um_per_px=0.6)
    return {"jpeg": open_slide(jpg, um_per_px=0.6), "pyramid": open_slide(tif)}


@pytest.mark.parametrize("kind", ["jpeg", "pyramid"])
@pytest.mark.parametrize("resample", ["lanczos", "bilinear"])
def test_crop_pairs_equal_read_crop_one_by_one_bit_for_bit(slides, kind, resample):
    slide = slides[kind]
    w, h = slide.dimensions
    rng = np.random.default_rng(1)
    centres = np.c_[rng.uniform(-40, w + 40, 40), rng.uniform(-40, h + 40, 40)]  # edges and outside included
    mpp = slide.um_per_px
    # (spot, niche, patch): same level for both, different levels, a crop read at its own size
    for spot_px, niche_px, patch in ((90.0, 270.0, 64), (60.0, 540.0, 32), (64.0, 192.0, 64)):
        crop = CropSpec(spot_um=spot_px * mpp, niche_um=niche_px * mpp, patch_px=patch, resample=resample)
        spot, niche, pad_s, pad_n = read_crop_pairs(slide, centres, crop)
        for got, pads, size in ((spot, pad_s, crop.pixels(mpp)[0]), (niche, pad_n, crop.pixels(mpp)[1])):
            for c, crop_c, pad in zip(centres, got, pads, strict=True):
                expected, padded = slide.read_crop(c, size, patch, resample=resample_filter(resample))
                np.testing.assert_array_equal(crop_c, expected)
                assert pad == padded


def test_slide_crops_batches_are_contiguous_nchw_and_bad_filters_fail_early(slides):
    crops = SlideCrops(slide=slides["jpeg"], centers_px=[[300.0, 500.0], [600.0, 900.0]],
                       crop=CropSpec(spot_um=108.0, niche_um=324.0, patch_px=32))
    batch = crops.read_batch([0, 1])
    assert batch["spot_image"].shape == (2, 3, 32, 32) and batch["spot_image"].is_contiguous()
    assert torch.equal(crops[1]["niche_image"], batch["niche_image"][1])
    with pytest.raises(CropSpecError, match="resample must be one of"):
        CropSpec(resample="bicubic")


def test_reading_plan_by_device_and_cores():
    assert reading_plan("cpu", 0) == {"readers": "none", "n": 0, "torch_threads": None}
    assert reading_plan("cuda", 12)["readers"] == "process"
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = reading_plan("cpu", 2, cores=2)
        assert plan["readers"] == "thread" and plan["n"] == 2 and plan["torch_threads"] == 1
        assert reading_plan("cpu", 2, cores=16)["torch_threads"] == 2  # never more than torch had
    finally:
        torch.set_num_threads(saved)
    with pytest.raises(ValueError, match="workers"):
        reading_plan("cpu", -1)


def test_reader_threads_predict_what_the_serial_path_predicts(slides):
    """predict_slide with reader threads (and 1 torch thread beside them on 2 cores) against the serial path:
    same crops bit for bit; embeddings within 1e-6 (fp32 sums may group differently with fewer torch threads,
    in practice equal), predictions the same to 1e-5."""
    import stalign
    from stalign.tasks.embed import embed_slide_crops
    from stalign.tasks.predict import predict_slide
    from stalign.tasks.retrieval import ReferenceBank

    torch.manual_seed(0)
    genes = [f"G{i}" for i in range(12)]
    model = stalign.create_model("stalign-tiny", genes=genes)
    rng = np.random.default_rng(0)
    bank = ReferenceBank(embeddings=rng.normal(size=(500, model.config.embed_dim)).astype(np.float32),
                         expression=rng.gamma(1.0, 1.0, (500, len(genes))).astype(np.float32), genes=genes,
                         info={"spot_um": 60.0, "niche_um": 180.0, "patch_px": 32, "resample": "bilinear"})
    slide = slides["pyramid"]
    w, h = slide.dimensions
    coords = np.c_[rng.uniform(0, w, 37), rng.uniform(0, h, 37)]
    crop = CropSpec(spot_um=60.0, niche_um=180.0, patch_px=32)  # the bank's (bilinear)
    crops = SlideCrops(slide=slide, centers_px=coords, crop=crop)
    serial = embed_slide_crops(model, crops, batch_size=8, workers=0, progress=False)
    threaded = embed_slide_crops(model, crops, batch_size=8, workers=2, progress=False)
    np.testing.assert_allclose(threaded, serial, rtol=0, atol=1e-6)
    # the old path: two read_crop calls per centre, the model in fp32 on the stacked crops
    filt = resample_filter("bilinear")
    old = [np.stack([slide.read_crop(c, size, 32, resample=filt)[0] for c in coords])
           for size in crop.pixels(slide.um_per_px)]
    with torch.inference_mode():
        old_emb = model.eval().encode_image(*(torch.from_numpy(a).permute(0, 3, 1, 2).contiguous() for a in old))
    np.testing.assert_allclose(threaded, old_emb.numpy(), rtol=0, atol=1e-6)
    out = predict_slide(model, slide, reference=bank, coords=coords, workers=2, batch_size=8, device="cpu",
                        progress=False)
    assert out.uns["stalign"]["resample"] == "bilinear"  # the bank's filter
    np.testing.assert_allclose(out.obsm["X_stalign"], serial, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.X, bank.predict(serial, k=50), rtol=0, atol=1e-5)
