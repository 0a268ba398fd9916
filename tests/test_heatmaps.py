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


def _tissue_slide(tmp_path):
    """A 600 x 480 px synthetic slide (1 µm/px): an H&E-pink blob with a notch, on white glass."""
    from PIL import Image

    from stalign.data.slide import open_slide

    h, w = 480, 600
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    tissue = (((xx - 290) / 220) ** 2 + ((yy - 230) / 170) ** 2 <= 1) & ~((xx > 380) & (yy < 150))
    rng = np.random.default_rng(0)
    rgb = np.where(tissue[..., None], [205, 120, 175], [246, 246, 246]) + rng.integers(-6, 7, (h, w, 3))
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(tmp_path / "slide.png")
    return open_slide(tmp_path / "slide.png", um_per_px=1.0), tissue


def _figure_pixels(fig, ax, xy):
    """RGB of the rendered figure at thumbnail points ``xy`` (data coordinates), and the whole buffer."""
    fig.canvas.draw()
    buf = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    disp = ax.transData.transform(np.asarray(xy, float))
    cols, rows = np.floor(disp[:, 0]).astype(int), (buf.shape[0] - np.ceil(disp[:, 1])).astype(int)
    return buf[rows, cols]


def test_grid_map_covers_every_tissue_tile_leaves_glass_blank_and_keeps_the_values(tmp_path):
    """Tiles of predict over a synthetic slide, a known linear expression: every tile is coloured, the glass is
    not, and the colour at each tile centre (and between tiles) maps back through the colour map to the value."""
    import matplotlib

    from stalign.tasks.heatmaps import gene_figure, make_canvas
    from stalign.tasks.predict import tile_tissue

    slide, tissue = _tissue_slide(tmp_path)
    step = 40.0
    tiles = tile_tissue(slide, step_px=step)
    expr = lambda p: 0.01 * p[:, 0] - 0.004 * p[:, 1] + 1.0  # noqa: E731 - known expression at any point
    lo, hi = float(expr(tiles).min()), float(expr(tiles).max())
    thumb, ds = slide.thumbnail(1024)
    assert ds == 1.0 and 60 < len(tiles) < 200
    canvas = make_canvas(tiles, thumbnail=thumb, downsample=ds, spot_diameter_px=step, mode="grid", um_per_px=1.0)
    fig, ax = gene_figure(canvas, expr(tiles), "known", limits=(lo, hi), cmap="viridis", alpha=1.0,
                          units="log1p(counts per 10,000)")
    lut = matplotlib.colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255

    def decode(rgb):  # nearest colour of the colour map -> (value, colour distance)
        d = np.linalg.norm(rgb[:, None] - lut[None], axis=-1)
        return lo + d.argmin(1) / 255 * (hi - lo), d.min(1)

    value, dist = decode(_figure_pixels(fig, ax, tiles))
    assert dist.max() < 12  # every tile centre is coloured
    assert np.abs(value - expr(tiles)).max() < 0.02 * (hi - lo)
    # between tiles (4 tiles around): the bilinear value of a linear expression is the expression itself
    have = {tuple(np.round(t / step).astype(int)) for t in tiles - step / 2}
    inner = np.array([t + step / 2 for t in tiles if all((tuple(np.round((t - step / 2) / step).astype(int) + d))
                                                          in have for d in ((0, 0), (1, 0), (0, 1), (1, 1)))])
    value, dist = decode(_figure_pixels(fig, ax, inner))
    assert len(inner) > 20 and dist.max() < 12 and np.abs(value - expr(inner)).max() < 0.03 * (hi - lo)
    # every tissue pixel inside a tile is coloured; glass pixels (away from the edge's anti-aliasing) are blank
    yy, xx = np.mgrid[0:tissue.shape[0]:3, 0:tissue.shape[1]:3] + 1.5
    pts = np.column_stack([xx.ravel(), yy.ravel()])
    in_tile = (np.abs(pts[:, None] - tiles[None]).max(-1) < step / 2 - 2).any(1)
    on_tissue = tissue[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    from scipy.ndimage import binary_dilation

    near_tissue = binary_dilation(tissue, iterations=4)[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    rgb = _figure_pixels(fig, ax, pts)
    _, dist = decode(rgb)
    assert (dist[in_tile & on_tissue] < 12).all()
    glass = rgb[~near_tissue]
    assert len(glass) > 1000 and (glass.min(1) > 225).mean() > 0.99  # white glass shows through, nothing drawn
    assert "log1p(counts per 10,000)" in fig.axes[1].get_ylabel()  # the colour bar names its units


def test_scale_bar_goes_where_it_hides_nothing():
    from stalign.tasks.heatmaps import _pyplot, draw_scale_bar

    plt = _pyplot()
    for busy_part, where in (("bottom left", "bottom right"), ("all", "below")):
        fig, ax = plt.subplots()
        ax.set_xlim(0, 400)
        ax.set_ylim(300, 0)
        busy = np.zeros((300, 400), bool)
        if busy_part == "all":
            busy[:] = True
        else:
            busy[200:, :200] = True
        assert draw_scale_bar(ax, 1.0, 400, busy) == 100
        x, y = ax.texts[0].get_position()
        if where == "below":
            assert y < 0 and ax.texts[0].get_transform() is not ax.transData  # axes fraction: under the picture
        else:
            assert x > 200 and y > 200
        plt.close(fig)
