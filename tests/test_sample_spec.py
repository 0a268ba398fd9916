"""A slide input named by keys (a prep --samples row, or the tutorials' one-line STALIGN_INPUT) reads the same
sample as the reader it names."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.data.sample_spec import parse_sample_spec, read_sample_spec


def test_one_line_spec_reads_the_anndata_image_sample(squidpy_crop):
    from stalign.data.readers import read_anndata_image

    spec = parse_sample_spec(f"h5ad={squidpy_crop / 'test_data.h5ad'} image='{squidpy_crop / 'test_img.jpg'}' "
                             "slide_id=mine")
    got = read_sample_spec(spec)
    want = read_anndata_image(squidpy_crop / "test_data.h5ad", squidpy_crop / "test_img.jpg")
    assert got.slide_id == "mine" and got.um_per_px == want.um_per_px and np.array_equal(got.coords_px, want.coords_px)
    relative = read_sample_spec({"h5ad": "test_data.h5ad", "image": "test_img.jpg"}, base=squidpy_crop)
    assert relative.n_spots == want.n_spots


@pytest.mark.parametrize("text, message", [("h5ad=a.h5ad", "needs h5ad\\+image"), ("slide=x.tif", "'slide=x.tif' is not KEY=VALUE"),
                                           ("hest=root", "needs h5ad\\+image, spaceranger, visium_hd, or hest\\+id")])
def test_bad_specs_are_named(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sample_spec(text)
