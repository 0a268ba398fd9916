"""Cost and accuracy of the Visium HD positions step (``stalign.data.visium_hd``) on a whole capture area.

    python benchmarks/visium_hd_positions.py              # 8 µm bins over 6.5 mm (812² = 659,344 positions)
    python benchmarks/visium_hd_positions.py --bin-um 16

Writes a synthetic ``tissue_positions.parquet`` as Space Ranger lays it out (one row per bin, in tissue or not),
then times reading it and the square-grid fit that gives the pixel size, against the known µm/px.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from stalign.data.pixel_size import grid_candidate
from stalign.data.visium_hd import read_positions_parquet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin-um", type=int, default=8)
    p.add_argument("--mpp", type=float, default=0.2738, help="true µm per full-res px")
    p.add_argument("--capture-um", type=float, default=6500.0)
    args = p.parse_args()
    n = int(args.capture_um / args.bin_um)
    rows, cols = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    path = Path(tempfile.mkdtemp()) / "tissue_positions.parquet"
    pd.DataFrame({"barcode": [f"s_{args.bin_um:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)],
                  "in_tissue": (rows > n // 3).astype(np.int32), "array_row": rows, "array_col": cols,
                  "pxl_row_in_fullres": (rows + 0.5) * args.bin_um / args.mpp,
                  "pxl_col_in_fullres": (cols + 0.5) * args.bin_um / args.mpp}).to_parquet(path)
    t0 = time.perf_counter()
    pos = read_positions_parquet(path)
    t1 = time.perf_counter()
    keep = np.linspace(0, len(pos) - 1, min(len(pos), 200_000)).astype(int)  # as read_visium_hd fits
    sub = pos.iloc[keep]
    mpp, _ = grid_candidate(sub["array_row"].to_numpy(), sub["array_col"].to_numpy(), sub[["x", "y"]].to_numpy(),
                            pitch_um=float(args.bin_um), packing="square", where=str(path))()
    t2 = time.perf_counter()
    print(f"{len(pos)} positions ({args.bin_um} µm bins): read {t1 - t0:.2f} s, grid fit {t2 - t1:.2f} s -> "
          f"{mpp:.5f} µm/px (true {args.mpp})")


if __name__ == "__main__":
    main()
