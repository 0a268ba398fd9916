"""open_slide / Slide on real files: the squidpy JPEG, openslide's fixtures and a tifffile-written pyramid."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from PIL import Image

from stalign.data.errors import DataPrepError, PixelSizeError, SlideError
from stalign.data.slide import _union_groups, open_slide, write_pyramidal_tiff


def textured_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth random colours (so downsampled levels are comparable) with sharp edges from a few blocks."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def test_crop_of_known_region_equals_the_jpeg_region(squidpy_crop):
    jpg = squidpy_crop / "test_img.jpg"
    direct = np.asarray(Image.open(jpg).convert("RGB"))
    with open_slide(jpg) as slide:
        assert slide.dimensions == (950, 1717) and slide.level_count == 1
        crop, padded = slide.read_crop((400, 500), 100, 100)
        assert not padded and crop.dtype == np.uint8 and crop.shape == (100, 100, 3)
        np.testing.assert_array_equal(crop, direct[450:550, 350:450])
        np.testing.assert_array_equal(slide.read_region_level0(10, 20, 30, 40), direct[20:60, 10:40])
        # a resampled crop equals PIL's resize of the same box of the whole image (filter context included)
        small, _ = slide.read_crop((400.5, 500.25), 200, 50)
        ref = np.asarray(Image.fromarray(direct).resize((50, 50), Image.Resampling.LANCZOS,
                                                        box=(300.5, 400.25, 500.5, 600.25)))
        assert np.abs(small.astype(int) - ref.astype(int)).max() <= 1


def test_crop_at_the_edge_is_padded_white(squidpy_crop):
    with open_slide(squidpy_crop / "test_img.jpg") as slide:
        crop, padded = slide.read_crop((10, 10), 40, 40)
        assert padded
        assert (crop[:10, :, :] == 255).all() and (crop[:, :10, :] == 255).all()
        assert (crop[15:, 15:] != 255).any()
        crops, flags = slide.read_crops(np.array([[10.0, 10.0], [400.0, 500.0], [949.0, 1000.0]]), 40, 16)
        assert crops.shape == (3, 16, 16, 3) and flags.tolist() == [True, False, True]


def test_pyramid_crop_comes_from_a_coarser_level(fetched):
    path = fetched("openslide-fixtures") / "boxes.tiff"
    with open_slide(path) as slide:
        assert slide.level_count == 4 and slide.dimensions == (300, 250)
        assert slide.best_level(4.5) == 2 and slide.best_level(1.5) == 0
        full = slide.read_region_level0(0, 0, 300, 250)
        levels_read = []
        backend_read = slide._backend.read
        slide._backend.read = lambda level, *a: levels_read.append(level) or backend_read(level, *a)
        crop, padded = slide.read_crop((150, 125), 200, 50)  # downsample 4 -> level 1 (2.0); 4.016 > 4
        assert not padded
        ref = np.asarray(Image.fromarray(full[25:225, 50:250]).resize((50, 50), Image.Resampling.BOX))
        assert np.abs(crop.astype(float) - ref).mean() < 12
        # an 8x reduction reads level 2 and still matches the level-0 region
        crop8, _ = slide.read_crop((150, 125), 240, 30)
        ref8 = np.asarray(Image.fromarray(full[5:245, 30:270]).resize((30, 30), Image.Resampling.BOX))
        assert np.abs(crop8.astype(float) - ref8).mean() < 15
        assert levels_read == [1, 2]
        # boxes.tiff says 72 dpi: a placeholder, not a calibration
        assert slide.um_per_px is None and "72" not in slide.pixel_size_source
        assert "plausible" in slide.pixel_size_note


def test_svs_and_dicom_pixel_size_from_metadata(fetched):
    folder = fetched("openslide-fixtures")
    with open_slide(folder / "small.svs") as slide:
        assert slide.um_per_px == pytest.approx(0.499)
        assert slide.pixel_size_source == "slide metadata (openslide.mpp-x)"
    with open_slide(folder / "boxes_0.dcm") as dicom:
        assert dicom.um_per_px == pytest.approx(0.499) and dicom.dimensions == (16, 16)
        assert dicom.read_crop((8, 8), 16, 16)[0].shape == (16, 16, 3)
    with open_slide(folder / "small.svs", um_per_px=0.25) as slide:
        assert slide.um_per_px == 0.25 and slide.pixel_size_source == "user flag"
    with pytest.raises(PixelSizeError, match="small.svs"):
        open_slide(folder / "small.svs", um_per_px=-1)


def test_tifffile_pyramid_reads_mpp_from_resolution_tags(tmp_path):
    image = textured_image(256, 320)
    path = write_pyramidal_tiff(tmp_path / "pyr.tif", image, um_per_px=0.5, tile=64)
    with open_slide(path) as slide:
        assert slide.level_count == 3 and slide.dimensions == (320, 256)
        assert slide.um_per_px == pytest.approx(0.5, rel=1e-4)
        assert slide.pixel_size_source.startswith("TIFF resolution tags")
        np.testing.assert_array_equal(slide.read_region_level0(64, 32, 100, 80), image[32:112, 64:164])
        crop, _ = slide.read_crop((160, 128), 128, 32)  # downsample 4 -> level 2
        ref = np.asarray(Image.fromarray(image[64:192, 96:224]).resize((32, 32), Image.Resampling.BOX))
        assert np.abs(crop.astype(float) - ref).mean() < 6


def test_stripped_tiff_and_rgba_png_open_through_fallbacks(tmp_path):
    import tifffile

    image = textured_image(60, 80)
    tifffile.imwrite(tmp_path / "flat.tif", image, photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    with open_slide(tmp_path / "flat.tif") as slide:
        assert slide.level_count == 1 and slide.um_per_px == pytest.approx(0.5)
        assert slide.pixel_size_source == "TIFF resolution tags"
        np.testing.assert_array_equal(slide.read_region_level0(0, 0, 80, 60), image)
    rgba = np.zeros((20, 20, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:10, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    with open_slide(tmp_path / "alpha.png") as slide:
        px = slide.read_region_level0(0, 0, 20, 20)
        assert px.shape == (20, 20, 3)
        assert (px[:10] == [200, 0, 0]).all() and (px[10:] == 255).all()


@pytest.mark.parametrize("name", ["unopenable.tiff", "unreadable.svs"])
def test_broken_openslide_fixtures_raise_slide_error(fetched, name):
    with pytest.raises(SlideError, match=name) as info:
        open_slide(fetched("openslide-fixtures") / name)
    assert isinstance(info.value, DataPrepError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("kind, keep", [("jpeg", 0.5), ("tiff", 0.5), ("tiff", 0.97)])
def test_truncated_files_raise_slide_error_at_open(tmp_path, squidpy_crop, kind, keep):
    if kind == "jpeg":
        src = squidpy_crop / "test_img.jpg"
    else:
        src = write_pyramidal_tiff(tmp_path / "src.tif", textured_image(512, 512), um_per_px=0.5, tile=128)
    data = src.read_bytes()
    cut = tmp_path / f"cut{src.suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SlideError, match=r"cut\.(jpg|tif): cannot open"):
        open_slide(cut)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="DICOM"):
        open_slide(tmp_path)


def test_plain_images_are_bounded_in_pixels_and_pils_guard_is_restored(tmp_path, squidpy_crop, monkeypatch):
    """A plain image is decoded whole: above MAX_PLAIN_IMAGE_PIXELS it is refused with a hint, PIL's own
    decompression-bomb limit is raised only while it opens (a legitimate 4-Mpx JPEG opens under a 1-Mpx PIL limit)."""
    from stalign.data import slide_backends

    w, h = Image.open(squidpy_crop / "test_img.jpg").size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", (w * h) // 4)  # PIL alone would refuse this JPEG
    assert open_slide(squidpy_crop / "test_img.jpg", um_per_px=1.0).dimensions == (w, h)
    assert Image.MAX_IMAGE_PIXELS == (w * h) // 4
    monkeypatch.setattr(slide_backends, "MAX_PLAIN_IMAGE_PIXELS", w * h - 1)
    with pytest.raises(SlideError, match=f"{w} x {h} px is more than a plain image may hold.*pyramidal TIFF"):
        open_slide(squidpy_crop / "test_img.jpg", um_per_px=1.0)
    assert Image.MAX_IMAGE_PIXELS == (w * h) // 4


def test_slide_pickles_by_path_and_thumbnail(fetched):
    path = fetched("openslide-fixtures") / "boxes.tiff"
    with open_slide(path, um_per_px=0.5) as slide:
        clone = pickle.loads(pickle.dumps(slide))
        assert clone.path == slide.path and clone.um_per_px == 0.5 and clone.pixel_size_source == "user flag"
        np.testing.assert_array_equal(clone.read_region_level0(0, 0, 50, 50), slide.read_region_level0(0, 0, 50, 50))
        thumb, ds = slide.thumbnail(100)
        assert max(thumb.shape[:2]) <= 100 and thumb.shape[1] == 100 and ds == pytest.approx(3.0)
        clone.close()


def test_dicom_folder_opens(fetched, tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(fetched("openslide-fixtures") / name, folder / name)
    with open_slide(folder) as slide:
        assert slide.um_per_px == pytest.approx(0.499)


def test_boxes_fixture_tissue_and_pixels_agree_with_png(fetched):
    from stalign.data.tissue import spots_on_tissue

    folder = fetched("openslide-fixtures")
    png = np.asarray(Image.open(folder / "boxes.png").convert("RGB"))
    with open_slide(folder / "boxes.tiff") as slide:
        assert np.abs(slide.read_region_level0(0, 0, 300, 250).astype(int) - png).max() <= 8  # lossy tiles
        on = spots_on_tissue(slide, np.array([[60.0, 50.0], [130.0, 140.0], [240.0, 200.0], [10.0, 240.0],
                                              [290.0, 10.0]]))
        assert on.tolist() == [True, True, True, False, False]  # red, blue, green boxes; white corners


@pytest.mark.parametrize("resample", ["lanczos", "bilinear"])
def test_grouped_crop_reads_equal_single_reads_through_openslide(tmp_path, resample):
    """``read_crops`` cuts neighbouring crops from one read of their common region: the same pixels as reading
    each apart (openslide generic-tiff pyramid, levels 2x apart; crops on levels 0 and 1, some off the image)."""
    from stalign.data.slide_backends import OpenSlideBackend

    path = write_pyramidal_tiff(tmp_path / "pyr.tif", textured_image(600, 800, seed=3), um_per_px=0.5, tile=64)
    rng = np.random.default_rng(0)
    rows = np.repeat([-10.0, 150.0, 300.0, 610.0], 10)  # raster order: bands of spots, the first and last off the edge
    centres = np.column_stack([np.tile(np.linspace(-15, 815, 10), 4) + rng.uniform(-3, 3, 40),
                               rows + rng.uniform(-3, 3, 40)])
    with open_slide(path) as slide:
        assert isinstance(slide._backend, OpenSlideBackend) and slide.level_count >= 2
        for size, out in ((50.3, 32), (131.7, 32), (64, 64)):
            plans = [slide._crop_plan(c, size, out) for c in centres]
            assert max(map(len, _union_groups(plans, slide.level_downsamples))) > 3  # crops do share reads
            grouped, pad_g = slide.read_crops(centres, size, out, resample=resample)
            single = [slide.read_crop(c, size, out, resample=resample) for c in centres]
            np.testing.assert_array_equal(grouped, np.stack([s[0] for s in single]))
            np.testing.assert_array_equal(pad_g, [s[1] for s in single])
        with pytest.raises(ValueError, match="resample must be one of bilinear, lanczos"):
            slide.read_crop(centres[0], 50, 32, resample="cubic")


def test_thumbnail_read_in_bands_and_crops_without_a_tile_cache_are_unchanged(tmp_path, monkeypatch):
    """The thumbnail reads its level in bands (bounded memory on slides with a large coarsest level) and equals
    the thumbnail of the level read at once; a slide handle without a tile cache reads the same crops."""
    from stalign.data import slide as slide_module

    img = textured_image(600, 800, seed=5)
    path = write_pyramidal_tiff(tmp_path / "pyr.tif", img, um_per_px=0.5, tile=64)
    centres = np.array([[100.0, 120.0], [400.0, 300.0], [790.0, 590.0]])
    with open_slide(path) as slide:
        level = slide.best_level(800 / 256)
        lw, lh = slide.level_dimensions[level]
        whole = Image.fromarray(slide._read_level(level, 0, 0, lw, lh))
        whole.thumbnail((256, 256), Image.Resampling.LANCZOS)
        crops, _ = slide.read_crops(centres, 131.7, 32)
        monkeypatch.setattr(slide_module, "UNION_MAX_PX", lw * 7)  # 7-row bands, the last one shorter
        thumb, ds = slide.thumbnail(256)
        np.testing.assert_array_equal(thumb, np.asarray(whole))
        assert ds == 800 / whole.size[0]
        slide.set_tile_cache(0)
        np.testing.assert_array_equal(slide.read_crops(centres, 131.7, 32)[0], crops)
