"""How much of the tissue a grid heat map colours, and how much glass: a synthetic slide tiled as ``stalign predict``
tiles it, drawn by ``stalign.tasks.heatmaps`` in ``--mode grid``.

    python benchmarks/heatmap_coverage.py /tmp/heatmap_coverage     # the synthetic slide is written there once
"""
from __future__ import annotations

import sys

import numpy as np

from stalign.data.slide import open_slide
from stalign.lab.synth import ensure_synthetic_slide
from stalign.tasks.heatmaps import make_canvas
from stalign.tasks.predict import tile_tissue


def main(out: str) -> None:
    synth = ensure_synthetic_slide(out, n_spots=150, seed=0, progress=False)
    slide = open_slide(synth.paths["image"])
    thumb, ds = slide.thumbnail(1024)
    for step_um in (112, 56):
        step = step_um / slide.um_per_px
        tiles = tile_tissue(slide, step_px=step)
        canvas = make_canvas(tiles, thumbnail=thumb, downsample=ds, spot_diameter_px=step, mode="grid")
        squares = make_canvas(tiles, thumbnail=None, downsample=ds, spot_diameter_px=step, mode="grid").layout.visible
        tissue, drawn = canvas.tissue, canvas.layout.visible
        h, w = min(tissue.shape[0], squares.shape[0]), min(tissue.shape[1], squares.shape[1])
        print(f"step {step_um} µm: {len(tiles)} tiles; tissue pixels coloured {drawn[tissue].mean():.1%} (the tiles' "
              f"own squares: {squares[:h, :w][tissue[:h, :w]].mean():.1%}); glass pixels coloured "
              f"{np.mean(drawn[~tissue]):.2%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/heatmap_coverage")
