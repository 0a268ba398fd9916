"""Patch storage of the shards, measured: write/read time per patch and size ratio of raw chunks, gzip (levels 1
and 4) and, when ``hdf5plugin`` is installed (for the benchmark only), LZ4 and Zstandard (plain and through Blosc
with byte shuffle), on the real Visium crop's spot and niche crops (224 px, one chunk per patch as in a shard).

    python benchmarks/patch_storage.py
    python benchmarks/patch_storage.py --no-record --repeat 1
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, parser, record, table  # noqa: E402


def codecs() -> dict[str, dict]:
    out = {"raw (stalign default)": {}, "gzip 1 (stalign before)": {"compression": "gzip", "compression_opts": 1},
           "gzip 4": {"compression": "gzip", "compression_opts": 4}}
    try:
        import hdf5plugin
    except ImportError:
        print("hdf5plugin not installed: no LZ4 / Zstandard rows (pip install hdf5plugin)")
        return out
    out["lz4 (hdf5plugin)"] = dict(hdf5plugin.LZ4())
    out["zstd 1 (hdf5plugin)"] = dict(hdf5plugin.Zstd(clevel=1))
    out["blosc lz4 + shuffle"] = dict(hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE))
    out["blosc zstd 1 + shuffle"] = dict(hdf5plugin.Blosc(cname="zstd", clevel=1, shuffle=hdf5plugin.Blosc.SHUFFLE))
    return out


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    import h5py
    import numpy as np

    from stalign.data.fetch import squidpy_crop_dir
    from stalign.data.readers import read_anndata_image
    from stalign.data.slide import open_slide

    crop = squidpy_crop_dir()
    sample = read_anndata_image(crop / "test_data.h5ad", crop / "test_img.jpg")
    with open_slide(sample.image_path, um_per_px=sample.um_per_px) as slide:
        patches = np.concatenate([slide.read_crops(sample.coords_px, um / sample.um_per_px, 224,
                                                   resample="bilinear")[0] for um in (112, 336)])
    load_before = load_average()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in codecs().items():
            path = os.path.join(tmp, "p.h5")
            writes, reads = [], []
            for _ in range(args.repeat):
                with h5py.File(path, "w") as f:
                    ds = f.create_dataset("p", shape=patches.shape, dtype=np.uint8, chunks=(1, 224, 224, 3), **kw)
                    t0 = time.perf_counter()
                    for i, x in enumerate(patches):
                        ds[i] = x
                    writes.append((time.perf_counter() - t0) / len(patches))
                with h5py.File(path, "r") as f:
                    t0 = time.perf_counter()
                    back = np.stack([f["p"][i] for i in range(len(patches))])
                    reads.append((time.perf_counter() - t0) / len(patches))
                assert np.array_equal(back, patches), name  # every codec here is lossless
            rows.append({"storage": name, "write ms/patch": float(np.median(writes)) * 1e3,
                         "read ms/patch": float(np.median(reads)) * 1e3,
                         "x smaller than raw": patches.nbytes / os.path.getsize(path)})
            print(rows[-1], flush=True)
    record(args, title="shard patch storage (benchmarks/patch_storage.py)", device="cpu", body=table(rows),
           load_before=load_before,
           notes=[f"{len(patches)} real H&E crops (49 spots x spot 112 µm + niche 336 µm, 224 px, bilinear) of the "
                  f"Visium crop; chunk = one patch; median of {args.repeat}; read back bit-identical for every codec"])


if __name__ == "__main__":
    main()
