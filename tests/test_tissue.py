"""Tissue mask on the real Visium crop and on blank / all-tissue images."""
from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from PIL import Image

from stalign.data.slide import open_slide
from stalign.data.tissue import otsu_threshold, spots_on_tissue, tissue_fraction, tissue_mask


def test_visium_spots_lie_on_tissue_and_background_is_found(squidpy_crop):
    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    with open_slide(squidpy_crop / "test_img.jpg") as slide:
        thumb, _ = slide.thumbnail(512)
        mask = tissue_mask(thumb)
        assert mask.shape == thumb.shape[:2]
        # the crop has grey glass on its left edge and top corner: some background, mostly tissue
        assert 0.5 < mask.mean() < 0.9
        assert not mask[:, :5].any()  # left strip is glass
        on = spots_on_tissue(slide, adata.obsm["spatial"], thumb_size=512, window_px=89.4)
        assert on.dtype == bool and on.shape == (adata.n_obs,)
        assert on.mean() > 0.9  # Space Ranger called all 49 spots in tissue
        glass = np.array([[5.0, 800.0], [10.0, 1500.0]])  # on the grey glass at the left edge
        assert not spots_on_tissue(slide, glass, thumb_size=512).any()
        assert spots_on_tissue(slide, glass, thumb_size=512, mask=mask).tolist() == [False, False]


def test_blank_and_flat_images_have_no_tissue(tmp_path):
    for value in (255, 235, 128, 0):
        assert not tissue_mask(np.full((64, 64, 3), value, np.uint8)).any()
    Image.fromarray(np.full((300, 200, 3), 250, np.uint8)).save(tmp_path / "blank.png")
    with open_slide(tmp_path / "blank.png") as slide:
        assert not spots_on_tissue(slide, np.array([[100.0, 150.0], [10.0, 10.0]])).any()


def test_all_tissue_image_is_all_tissue_and_pink_blob_is_found():
    rng = np.random.default_rng(0)
    tissue = np.stack([rng.integers(150, 230, (80, 80)), rng.integers(60, 140, (80, 80)),
                       rng.integers(140, 210, (80, 80))], axis=-1).astype(np.uint8)
    assert tissue_mask(tissue).mean() > 0.99  # no background: Otsu must not split pale from dark tissue
    img = np.full((100, 100, 3), 245, np.uint8)
    img[30:70, 20:60] = tissue[:40, :40]
    mask = tissue_mask(img)
    assert mask[35:65, 25:55].all() and not mask[:25].any() and not mask[:, 65:].any()


def test_otsu_and_fraction_helpers():
    values = np.concatenate([np.full(100, 0.1), np.full(100, 0.7)])
    assert 0.1 <= otsu_threshold(values) < 0.7
    mask = np.zeros((10, 10), dtype=bool)
    mask[:, 5:] = True
    frac = tissue_fraction(mask, np.array([[7.2, 5.0], [1.0, 5.0], [5.0, 5.0]]), radius=1)
    assert frac.tolist() == pytest.approx([1.0, 0.0, 2 / 3])
