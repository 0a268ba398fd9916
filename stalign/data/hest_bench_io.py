"""HEST-Bench's data layout on disk: patch files (HDF5 ``img`` (N, H, W, 3) uint8, ``barcode``, ``coords``) and a
whole task folder (``var_50genes.json``, ``splits/train_i.csv``/``test_i.csv``, ``patches/``, ``adata/``) exported
from ``stalign prep`` shards, so the exact HEST protocol (``stalign bench --hest-bench``) runs on your own slides."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stalign.data.errors import DataPrepError
from stofm.util.errors import InputError


def read_patches(path: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """(img (N, H, W, 3) uint8, barcodes) of a HEST patch file."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            img, barcodes = f["img"][()], f["barcode"][()]
    except (OSError, KeyError) as err:
        raise DataPrepError(f"{path}: not a HEST patch file with img and barcode ({err})") from None
    return np.asarray(img, np.uint8), [b.decode() if isinstance(b, bytes) else str(b) for b in np.ravel(barcodes)]


def write_patches(path: str | os.PathLike, img: np.ndarray, barcodes: Sequence[str], coords: np.ndarray) -> Path:
    """Write a HEST patch file (``img``, ``barcode``, ``coords``)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["img"] = np.asarray(img, np.uint8)
        f["barcode"] = np.asarray([str(b).encode() for b in barcodes])[:, None]
        f["coords"] = np.asarray(coords)
    return path


def export_task(shards: str | os.PathLike, out: str | os.PathLike, *, genes: Sequence[str] | None = None) -> Path:
    """A HEST-Bench task folder from a shards folder: spot crops as patch files, expression as AnnData whose
    ``log1p`` equals the shards' values (``expm1`` of them is stored), the panel (or ``genes``) as the gene list and
    leave-one-slide-out splits. Needs two or more slides."""
    import anndata as ad
    import pandas as pd

    from stalign.data.shards import read_manifest, read_shard

    root, out = Path(shards), Path(out)
    manifest = read_manifest(root)
    slides = manifest["slides"]
    if len(slides) < 2:
        raise InputError(f"{root}: HEST-Bench splits by slide; export needs two or more slides (has {len(slides)})")
    panel = list(manifest["genes"])
    chosen = list(genes) if genes else panel
    missing = [g for g in chosen if g not in panel]
    if missing:
        raise InputError(f"genes not in the shards' panel: {missing[:10]}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    for s in slides:
        shard = read_shard(root / s["shard"], patches=True)
        sid = s["slide_id"]
        write_patches(out / "patches" / f"{sid}.h5", shard["spot_patches"], shard["barcodes"], shard["coords_px"])
        adata = ad.AnnData(X=np.expm1(np.asarray(shard["expr"], np.float64)),
                           obs=pd.DataFrame(index=pd.Index(shard["barcodes"], dtype=str)),
                           var=pd.DataFrame(index=pd.Index(panel, dtype=str)))
        (out / "adata").mkdir(parents=True, exist_ok=True)
        adata.write_h5ad(out / "adata" / f"{sid}.h5ad")
    (out / "var_50genes.json").write_text(json.dumps({"genes": chosen}))
    (out / "splits").mkdir()
    ids = [s["slide_id"] for s in slides]
    for i, test in enumerate(ids):
        for kind, members in (("train", [x for x in ids if x != test]), ("test", [test])):
            pd.DataFrame({"sample_id": members, "patches_path": [f"patches/{x}.h5" for x in members],
                          "expr_path": [f"adata/{x}.h5ad" for x in members]}).to_csv(
                out / "splits" / f"{kind}_{i}.csv", index=False)
    return out
