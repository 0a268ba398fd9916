"""Prep side of ``benchmarks/peers.py``: the generated slide and the three ways of cutting its spots into HDF5.

- ``make_slide``: a JPEG-compressed (deflate without ``imagecodecs``) tiled pyramidal TIFF (levels 2x apart, H&E-like periodic texture, an
  elliptical tissue region on white) that openslide opens, written tile by tile in bounded memory, plus an
  AnnData of Poisson counts whose ``obsm['spatial']`` holds spot centres on a square grid inside the tissue.
- ``run_stalign``: ``stalign.data.pipeline.prepare`` (spot + niche crops, expression, tissue mask, kNN, shard).
- ``run_hest``: HEST-style ``dump_patches`` written from HEST's published behaviour (not its code): per spot,
  ``read_region`` of the source-size patch at the best level, resize to the target size (bilinear), and the
  patch appended to the HDF5 file by reopening it and growing its datasets by one row.
- ``run_plain``: the plain openslide + h5py loop: ``read_region`` at the best level, bilinear resize, written
  into a preallocated uncompressed (N, P, P, 3) dataset.

Each runner is meant to run in its own process (``python benchmarks/peer_prep.py RUNNER ...``) so its peak
memory (RSS summed over the process and its children, sampled every 20 ms) is its own.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TILE = 256
TISSUE_RADIUS = 0.46  # of the slide's width/height: an ellipse of tissue, white outside


def _texture(n: int = 2048, seed: int = 0) -> np.ndarray:
    """(n, n, 3) uint8 periodic H&E-like texture: pink stroma modulated at two scales, purple nuclei."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    low = ndimage.gaussian_filter(rng.random((n // 8, n // 8)), 3, mode="wrap")
    low = (low - low.min()) / (np.ptp(low) + 1e-9)
    big = np.kron(low, np.ones((8, 8)))
    nuclei = ndimage.gaussian_filter((rng.random((n, n)) < 0.002).astype(np.float64), 2.5, mode="wrap")
    nuclei = np.clip(nuclei / nuclei.max() * 4, 0, 1)[..., None]
    fine = ndimage.gaussian_filter(rng.random((n, n)), 1.0, mode="wrap")
    a = (0.6 * big + 0.4 * fine)[..., None]
    img = np.array([245, 235, 240.0]) * (1 - a) * 0.3 + np.array([232, 160, 200.0]) * (0.7 + 0.3 * a)
    img = img * (1 - nuclei) + np.array([120, 60, 150.0]) * nuclei
    return np.clip(img, 0, 255).astype(np.uint8)


def _level_tiles(tex: np.ndarray, size: int, ds: int):
    """Tiles (row-major) of the level ``ds`` times smaller than the ``size``-px square slide."""
    sub = tex[::ds, ::ds]
    n, w = sub.shape[0], -(-size // ds)
    for y in range(0, w, TILE):
        yy = (np.arange(y, y + TILE) * ds / size - 0.5)[:, None] ** 2
        rows = sub[np.arange(y, y + TILE) % n]
        for x in range(0, w, TILE):
            tile = rows[:, np.arange(x, x + TILE) % n].copy()
            xx = (np.arange(x, x + TILE) * ds / size - 0.5)[None, :] ** 2
            tile[(xx + yy) > TISSUE_RADIUS ** 2] = 255
            yield tile


def make_slide(folder: Path, *, size_px: int, n_spots: int, um_per_px: float = 0.25, n_genes: int = 200,
               seed: int = 0) -> tuple[Path, Path]:
    """(TIFF, h5ad) of the benchmark slide in ``folder`` (reused when both exist with a matching ``spec.json``)."""
    import anndata as ad
    import tifffile

    folder.mkdir(parents=True, exist_ok=True)
    tif, h5ad, spec_file = folder / "slide.tif", folder / "slide.h5ad", folder / "spec.json"
    try:
        import imagecodecs  # noqa: F401  (tifffile's JPEG encoder)
        codec = {"compression": "jpeg", "compressionargs": {"level": 90}}
    except ImportError:
        print("imagecodecs not installed: slide tiles deflate-compressed instead of JPEG (pip install imagecodecs)")
        codec = {"compression": "zlib"}
    spec = {"size_px": size_px, "n_spots": n_spots, "um_per_px": um_per_px, "n_genes": n_genes, "seed": seed,
            "tiles": codec["compression"]}
    if tif.exists() and h5ad.exists() and spec_file.exists() and json.loads(spec_file.read_text()) == spec:
        return tif, h5ad
    spec_file.unlink(missing_ok=True)
    tex = _texture(n=min(2048, max(256, size_px // 4)), seed=seed)
    res = 1e4 / um_per_px
    with tifffile.TiffWriter(tif, bigtiff=True) as tw:
        ds = 1
        while True:
            side = -(-size_px // ds)
            tw.write(_level_tiles(tex, size_px, ds), shape=(side, side, 3), dtype=np.uint8, tile=(TILE, TILE),
                     photometric="rgb", **codec,
                     subfiletype=0 if ds == 1 else 1, resolution=(res, res), resolutionunit="CENTIMETER",
                     metadata=None)
            if side <= 2048:
                break
            ds *= 2
    # spot centres on a square grid inside the tissue ellipse, a niche crop (336 µm) away from its edge
    inner = TISSUE_RADIUS * size_px - 200 / um_per_px
    pitch = np.sqrt(np.pi * inner ** 2 / n_spots)
    while True:
        axis = np.arange(size_px / 2 - inner, size_px / 2 + inner + 1, pitch)
        xy = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
        xy = xy[((xy - size_px / 2) ** 2).sum(1) <= inner ** 2]
        if len(xy) >= n_spots:
            break
        pitch *= 0.97
    xy = xy[np.linspace(0, len(xy) - 1, n_spots).round().astype(int)]
    rng = np.random.default_rng(seed)
    counts = rng.poisson(rng.gamma(0.5, 4.0, size=n_genes), size=(len(xy), n_genes)).astype(np.float32)
    adata = ad.AnnData(counts)
    adata.obs_names = [f"spot{i}" for i in range(len(xy))]
    adata.var_names = [f"gene{i}" for i in range(n_genes)]
    adata.obsm["spatial"] = xy
    adata.write_h5ad(h5ad)
    spec_file.write_text(json.dumps(spec))
    return tif, h5ad


def _best_level(osr, downsample: float) -> int:
    best = 0
    for i, ds in enumerate(osr.level_downsamples):
        if ds <= downsample * (1 + 1e-9):
            best = i
    return best


def _read_resized(osr, cx: float, cy: float, size_px: float, out_px: int):
    """``read_region`` of the ``size_px`` level-0 square around (cx, cy) at the best level, bilinear to out_px."""
    from PIL import Image

    level = _best_level(osr, size_px / out_px)
    ds = osr.level_downsamples[level]
    n = max(int(round(size_px / ds)), 1)
    tile = osr.read_region((int(cx - size_px / 2), int(cy - size_px / 2)), level, (n, n)).convert("RGB")
    if n != out_px:
        tile = tile.resize((out_px, out_px), Image.Resampling.BILINEAR)
    return np.asarray(tile)


def run_plain(tif: Path, h5ad: Path, out: Path, *, spot_um: float = 112.0, patch_px: int = 224,
              slides: int = 1) -> int:
    """The plain openslide + h5py loop (spot crops only), over ``slides`` copies of the slide one after another
    (``plain.h5``, then ``plain_1.h5``, ...); returns the number of spots written."""
    import anndata as ad
    import h5py
    import openslide

    total = 0
    for k in range(slides):
        xy = np.asarray(ad.read_h5ad(h5ad, backed="r").obsm["spatial"], dtype=np.float64)
        osr = openslide.OpenSlide(str(tif))
        size = spot_um / float(osr.properties["openslide.mpp-x"])
        with h5py.File(out / ("plain.h5" if k == 0 else f"plain_{k}.h5"), "w") as f:
            img = f.create_dataset("img", shape=(len(xy), patch_px, patch_px, 3), dtype=np.uint8,
                                   chunks=(1, patch_px, patch_px, 3))
            for i, (cx, cy) in enumerate(xy):
                img[i] = _read_resized(osr, cx, cy, size, patch_px)
            f.create_dataset("coords", data=xy)
        osr.close()
        total += len(xy)
    return total


def _append(path: Path, arrays: dict[str, np.ndarray], first: bool) -> None:
    """HEST-style ``save_hdf5``: open the file, create or grow each dataset by the new rows, close."""
    import h5py

    with h5py.File(path, "w" if first else "a") as f:
        for key, val in arrays.items():
            if key not in f:
                f.create_dataset(key, data=val, maxshape=(None, *val.shape[1:]), chunks=(1, *val.shape[1:]))
            else:
                ds = f[key]
                ds.resize(len(ds) + len(val), axis=0)
                ds[-len(val):] = val


def run_hest(tif: Path, h5ad: Path, out: Path, *, spot_um: float = 112.0, patch_px: int = 224,
             slides: int = 1) -> int:
    """HEST-style per-patch dump (spot crops only, target 0.5 µm/px x 224 px = 112 µm), over ``slides`` copies of
    the slide one after another (``hest_patches.h5``, then ``hest_patches_1.h5``, ...)."""
    import anndata as ad
    import openslide

    total = 0
    for k in range(slides):
        xy = np.asarray(ad.read_h5ad(h5ad, backed="r").obsm["spatial"], dtype=np.float64)
        barcodes = np.asarray(ad.read_h5ad(h5ad, backed="r").obs_names, dtype="S")
        osr = openslide.OpenSlide(str(tif))
        size = spot_um / float(osr.properties["openslide.mpp-x"])
        path = out / ("hest_patches.h5" if k == 0 else f"hest_patches_{k}.h5")
        for i, (cx, cy) in enumerate(xy):
            tile = _read_resized(osr, cx, cy, size, patch_px)
            _append(path, {"img": tile[None], "barcode": barcodes[i:i + 1, None],
                           "coords": np.array([[cx - size / 2, cy - size / 2]], dtype=np.int64)}, first=i == 0)
        osr.close()
        total += len(xy)
    return total


def run_stalign(tif: Path, h5ad: Path, out: Path, *, workers: int = 1, slides: int = 1, **options) -> int:
    """``stalign.data.pipeline.prepare`` of the slide (spot + niche crops), or of ``slides`` copies of it in one
    prep (ids ``slide``, ``slide_1``, ...); returns the spots written."""
    from functools import partial

    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image

    samples = [partial(read_anndata_image, h5ad, tif, slide_id="slide" if k == 0 else f"slide_{k}")
               for k in range(slides)]
    manifest = prepare(samples, out, workers=workers, progress=False, **options)
    return sum(s["n_spots"] for s in manifest["slides"])


class TreeMemory:
    """Peak RSS summed over this process and all its descendants, sampled every ``interval`` s (psutil)."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.proc, self.interval, self.peak, self._stop = psutil.Process(), interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.proc, *self.proc.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


RUNNERS = {"stalign": run_stalign, "hest": run_hest, "plain": run_plain}


def main(argv: list[str]) -> None:
    """``RUNNER TIF H5AD OUT [JSON options]``: run once, print one JSON line (spots, seconds, cpu, peak MiB,
    output MiB)."""
    name, tif, h5ad, out = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    options = json.loads(argv[4]) if len(argv) > 4 else {}
    out.mkdir(parents=True, exist_ok=True)
    with TreeMemory() as mem:
        t0, c0 = time.perf_counter(), cpu_seconds()
        n = RUNNERS[name](tif, h5ad, out, **options)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    size = sum(p.stat().st_size for p in out.rglob("*.h5"))
    print(json.dumps({"spots": n, "seconds": seconds, "cpu": cpu, "peak_mib": mem.peak / 2**20,
                      "output_mib": size / 2**20}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1:])
