"""Heat maps of chosen genes over the real H&E crop: files written, non-empty, coloured where the spots are."""
from __future__ import annotations

import re

import numpy as np
import pytest

from stalign.tasks.heatmaps import plot_gene_heatmaps


@pytest.fixture(scope="module")
def crop(squidpy_crop):
    import anndata as ad
    from PIL import Image

    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    img = Image.open(squidpy_crop / "test_img.jpg").convert("RGB")
    full_w = img.size[0]
    img.thumbnail((256, 256))
    return adata, np.asarray(img), full_w / img.size[0]


@pytest.mark.parametrize("mode", ["spots", "grid"])
def test_one_png_per_gene_over_the_thumbnail(tmp_path, crop, mode):
    from PIL import Image

    adata, thumb, ds = crop
    genes = ["Gad1", "Hbb-bs", "Sst/odd name"]
    values = np.column_stack([adata[:, "Gad1"].X.toarray()[:, 0], adata[:, "Hbb-bs"].X.toarray()[:, 0],
                              np.linspace(0, 1, adata.n_obs)])
    paths = plot_gene_heatmaps(values, genes, adata.obsm["spatial"], tmp_path, thumbnail=thumb, downsample=ds,
                               spot_diameter_px=89.44, mode=mode, dpi=60)
    assert [p.name for p in paths[:2]] == ["Gad1.png", "Hbb-bs.png"]
    assert re.fullmatch(r"Sst_odd_name-[0-9a-f]{6}\.png", paths[2].name)  # changed names carry a hash: distinct
    for p in paths:
        assert p.stat().st_size > 5000
        img = np.asarray(Image.open(p).convert("RGB")).astype(int)
        assert img.std() > 10  # not a blank canvas
    # the map differs between genes (values are drawn, not only the thumbnail)
    a, b = (np.asarray(Image.open(p).convert("RGB")).astype(int) for p in paths[:2])
    h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
    assert np.abs(a[:h, :w] - b[:h, :w]).mean() > 1


def test_panel_and_bad_input(tmp_path, crop):
    adata, thumb, ds = crop
    values = adata.X[:, :5].toarray()
    paths = plot_gene_heatmaps(values, list(adata.var_names[:5]), adata.obsm["spatial"], tmp_path, thumbnail=thumb,
                               downsample=ds, panel=True, dpi=50)
    assert len(paths) == 1 and paths[0].stat().st_size > 5000
    with pytest.raises(ValueError, match="n_genes=4"):
        plot_gene_heatmaps(values, list(adata.var_names[:4]), adata.obsm["spatial"], tmp_path)
    with pytest.raises(ValueError, match="mode"):
        plot_gene_heatmaps(values, list(adata.var_names[:5]), adata.obsm["spatial"], tmp_path, mode="contour")


def test_compared_maps_share_one_colour_scale_and_carry_a_scale_bar(tmp_path, monkeypatch):
    """Predicted and measured maps drawn with heatmap_limits use the same (vmin, vmax); with um_per_px a scale bar
    of a round length in µm is drawn."""
    from stalign.tasks import heatmaps

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 2000, (40, 2))
    pred, measured = rng.normal(0, 1, (40, 2)), rng.normal(3, 2, (40, 2))
    seen, bars = [], []
    real_draw, real_bar = heatmaps.draw_spots, heatmaps.draw_scale_bar
    monkeypatch.setattr(heatmaps, "draw_spots", lambda *a, **k: seen.append((k["vmin"], k["vmax"])) or real_draw(*a, **k))
    monkeypatch.setattr(heatmaps, "draw_scale_bar", lambda *a: bars.append(real_bar(*a)) or bars[-1])
    limits = heatmaps.heatmap_limits(pred, measured)
    for values, name in ((pred, "p"), (measured, "m")):
        heatmaps.plot_gene_heatmaps(values, ["A", "B"], xy, tmp_path / name, limits=limits, um_per_px=0.5)
    assert seen[0] == seen[2] == limits[0] and seen[1] == seen[3] == limits[1]
    assert limits[0][0] < np.percentile(pred[:, 0], 5) and limits[0][1] > np.percentile(measured[:, 0], 95)
    assert bars and all(b in heatmaps.SCALE_BAR_UM for b in bars) and bars[0] == 200  # ~1/5 of 1000 µm
    with pytest.raises(ValueError, match="colour limits"):
        heatmaps.plot_gene_heatmaps(pred, ["A", "B"], xy, tmp_path / "x", limits=limits[:1])
