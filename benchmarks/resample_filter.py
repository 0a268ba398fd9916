"""Crop resampling filter, measured: Lanczos (what prep and predict use) vs antialiased bilinear (the plain path),
on the real Visium crop, in one run.

    python benchmarks/resample_filter.py                 # 49 spots, spot 112 um + niche 336 um crops at 224 px
    python benchmarks/resample_filter.py --quick         # 32 px crops (seconds)

Per filter: crop read time (spot + niche, median of repeats), the ImageNet efficientnet-lite0 embeddings of the
spot crops, and the HEST-style ridge probe (5-fold, top-50 variance genes, mean per-gene Pearson r and MSE). Also
the cosine between the two filters' embeddings of the same crop: how much the choice changes what a model sees.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, parser, record, setup, table


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image

    from stalign.data.fetch import squidpy_crop_dir
    from stalign.data.readers import read_anndata_image
    from stalign.data.slide import open_slide
    from stalign.models.image_encoders import create_image_encoder
    from stalign.tasks.hest import cross_validate, ridge_probe

    device = setup(args)
    crop = squidpy_crop_dir()
    sample = read_anndata_image(crop / "test_data.h5ad", crop / "test_img.jpg")
    out_px = 32 if args.quick else 224
    spot_px, niche_px = 112 / sample.um_per_px, 336 / sample.um_per_px
    expr = sample.adata.X.toarray() if hasattr(sample.adata.X, "toarray") else np.asarray(sample.adata.X)
    top = np.argsort(-expr.var(0))[:50]
    y = expr[:, top].astype(np.float64)
    net = create_image_encoder("efficientnet-lite0", pretrained=True).to(device).eval()
    load_before = load_average()
    rows, embeddings = [], {}
    filters = {"Lanczos (package)": Image.Resampling.LANCZOS, "bilinear, antialiased": Image.Resampling.BILINEAR}
    with open_slide(sample.image_path, um_per_px=sample.um_per_px) as slide:
        for name, flt in filters.items():
            times = []
            for _ in range(1 if args.quick else args.repeat):
                t0 = time.perf_counter()
                spots, _ = slide.read_crops(sample.coords_px, spot_px, out_px, resample=flt)
                slide.read_crops(sample.coords_px, niche_px, out_px, resample=flt)
                times.append(time.perf_counter() - t0)
            with torch.inference_mode():
                emb = net(torch.from_numpy(spots).permute(0, 3, 1, 2).contiguous().to(device)).float().cpu().numpy()
            embeddings[name] = emb
            folds = np.random.default_rng(0).permutation(len(y)) % 5
            splits = [(np.flatnonzero(folds != k), np.flatnonzero(folds == k)) for k in range(5)]
            res = cross_validate(lambda tr, te, e=emb: ridge_probe(e[tr], y[tr], e[te]), y, splits,
                                 [str(g) for g in sample.adata.var_names[top]])
            seconds = float(np.median(times))
            rows.append({"filter": name, "ms per spot (spot + niche crops)": seconds / len(y) * 1e3,
                         "ridge Pearson r (5-fold, 50 genes)": float(np.nanmean(res.fold_pearson)),
                         "ridge MSE": float(np.mean(res.fold_mse))})
            print(rows[-1], flush=True)
    a, b = embeddings.values()
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    base = rows[0]["ms per spot (spot + niche crops)"]
    for r in rows:
        r["x faster than Lanczos"] = base / r["ms per spot (spot + niche crops)"]
    notes = [f"{len(y)} real Visium spots at {sample.um_per_px:.4f} um/px; crops {out_px} px; efficientnet-lite0 "
             f"(ImageNet) spot-crop embeddings; cosine between the two filters' embeddings: mean {cos.mean():.4f}, "
             f"min {cos.min():.4f}",
             "49 spots cannot rank the filters by Pearson (differences of this size are noise); the cosine says how "
             "much a trained model's inputs would shift if prep and predict used different filters"]
    record(args, title=f"crop resampling filter, {out_px} px, on {device.type.upper()}", device=device,
           body=table(rows), load_before=load_before, notes=notes)


if __name__ == "__main__":
    main()
