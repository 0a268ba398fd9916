"""Speed of Macenko stain normalisation (stalign.data.stain.normalize) on 224 px crops of the real Visium crop
(docs/readers.md): python benchmarks/stain_speed.py"""
import time

import numpy as np
from PIL import Image

from stalign.data.fetch import squidpy_crop_dir
from stalign.data.stain import fit_target, normalize

img = np.asarray(Image.open(squidpy_crop_dir() / "test_img.jpg").convert("RGB"))
h, w = img.shape[:2]
crops = np.stack([img[y:y + 224, x:x + 224] for y in range(0, h - 224, 224) for x in range(0, w - 224, 224)])[:64]
m, c = fit_target(crops)
t = time.perf_counter()
normalize(crops, m, c)
dt = time.perf_counter() - t
print(f"image {w}x{h}; {len(crops)} crops 224 px: {dt:.2f} s, {1000 * dt / len(crops):.1f} ms/crop; "
      f"target H {np.round(m[:, 0], 3)} E {np.round(m[:, 1], 3)} max {np.round(c, 3)}")
