"""Predict's crop reading before the crop spec (one slide read per spot + niche pair, ``read_crop_pair`` of
commit 247c75a, taken from git history) against the one crop reader now shared with prep (``read_crop_pairs``:
neighbouring crops of a batch cut from shared reads): same crops, tiles per second, interleaved repetitions.

    python benchmarks/crop_reader_change.py [IMAGE]     # default: the squidpy crop's H&E, scaled to 8000 x 8000
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from stalign.data.crop_spec import CropSpec
from stalign.data.slide import open_slide, write_pyramidal_tiff
from stalign.tasks.crop_reading import SlideCrops

REPO = Path(__file__).resolve().parents[1]
work = Path(tempfile.mkdtemp(prefix="stalign-reader-"))
(work / "old_crop_reading.py").write_text(subprocess.run(
    ["git", "-C", str(REPO), "show", "247c75a:stalign/tasks/crop_reading.py"], capture_output=True, text=True,
    check=True).stdout)
spec = importlib.util.spec_from_file_location("old_cr", work / "old_crop_reading.py")
old = importlib.util.module_from_spec(spec)
spec.loader.exec_module(old)
path = work / "slide.tif"
image = sys.argv[1] if len(sys.argv) > 1 else REPO.parent / "shared/data/squidpy_visium_crop/test_img.jpg"
if not os.path.exists(path):
    base = np.asarray(Image.open(image).convert("RGB").resize((8000, 8000), Image.Resampling.BILINEAR))
    write_pyramidal_tiff(path, base, um_per_px=0.5, levels=4)
slide = open_slide(path)
crop = CropSpec()  # 112/336 um at 224 px, bilinear
step = crop.spot_um / slide.um_per_px
xs = np.arange(step / 2, 8000, step)
centres = np.stack(np.meshgrid(xs, xs), -1).reshape(-1, 2)
new = SlideCrops(slide=slide, centers_px=centres, crop=crop)
sp, npx = crop.pixels(slide.um_per_px)
oldc = old.SlideCrops(slide=slide, centers_px=centres, spot_px=sp, niche_px=npx, patch_px=224, resample="bilinear")
batches = [range(s, min(s + 32, len(centres))) for s in range(0, len(centres), 32)]
res = {"old": [], "new": []}
for _ in range(3):
    for name, c in (("old", oldc), ("new", new)):
        t = time.perf_counter()
        for b in batches:
            out = c.read_batch(b)
        res[name].append(time.perf_counter() - t)
a, b = oldc.read_batch(batches[3]), new.read_batch(batches[3])
assert all((a[k] == b[k]).all() for k in a), "crops differ"
med = {k: sorted(v)[1] for k, v in res.items()}
print(f"{len(centres)} tiles, 224 px spot+niche, bilinear, 1 thread: old per-pair {len(centres)/med['old']:.0f} tiles/s, "
      f"new batched {len(centres)/med['new']:.0f} tiles/s, new/old speed {med['old']/med['new']:.2f}x "
      f"(runs old {[f'{x:.2f}' for x in res['old']]} s, new {[f'{x:.2f}' for x in res['new']]} s)")
