"""HEST-Bench's data layout on disk: patch files (HDF5 ``img`` (N, H, W, 3) uint8, ``barcode``, ``coords``; an
optional ``niche_img``, written by ``export_task``, is the wider crop around each spot that HEST ignores) and a
whole task folder (``var_50genes.json``, ``splits/train_i.csv``/``test_i.csv``, ``patches/``, ``adata/``) exported
from ``stalign prep`` shards, so the exact HEST protocol (``stalign bench --hest-bench``) runs on your own slides.

Patch files are checked when read (one line naming the file): ``img`` must be (N, H, W, 3), uint8 or float in
[0, 1] (kept as float: the encoders take both), without NaN; ``barcode`` must have N entries."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stalign.data.errors import DataPrepError
from stofm.util.errors import InputError

_CHECK_ROWS = 256  # rows of a float patch array scanned at a time for NaN / range


def _check_images(path: str | os.PathLike, name: str, dset, n: int | None) -> None:
    """Shape (N, H, W, 3), dtype uint8 or float in [0, 1] without NaN, N == ``n``: else one line naming the file."""
    shape, dtype = tuple(dset.shape), dset.dtype
    if len(shape) != 4 or shape[-1] != 3:
        raise DataPrepError(f"{path}: {name} has shape {shape}; HEST patches are (N, H, W, 3) RGB")
    if n is not None and shape[0] != n:
        raise DataPrepError(f"{path}: {name} holds {shape[0]} patches but barcode {n} entries")
    if dtype == np.uint8:
        return
    if dtype.kind != "f":
        raise DataPrepError(f"{path}: {name} is {dtype}; HEST patches are uint8 [0, 255] (or float [0, 1])")
    lo, hi = np.inf, -np.inf
    for s in range(0, shape[0], _CHECK_ROWS):
        block = np.asarray(dset[s:s + _CHECK_ROWS], np.float32)
        bad = ~np.isfinite(block)
        if bad.any():
            raise DataPrepError(f"{path}: {name} patch {s + int(np.argmax(bad.reshape(len(block), -1).any(1)))} "
                                "holds NaN/inf values")
        if block.size:
            lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
    if lo < 0 or hi > 1:
        raise DataPrepError(f"{path}: {name} is {dtype} with values in [{lo:g}, {hi:g}]; float patches must lie "
                            "in [0, 1] (or store uint8 [0, 255])")


def patch_file_info(path: str | os.PathLike) -> tuple[list[str], bool]:
    """(barcodes, has ``niche_img``) of a HEST patch file, its images checked (see module doc)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            barcodes = [b.decode() if isinstance(b, bytes) else str(b) for b in np.ravel(f["barcode"][()])]
            _check_images(path, "img", f["img"], len(barcodes))
            niche = "niche_img" in f
            if niche:
                _check_images(path, "niche_img", f["niche_img"], len(barcodes))
    except (OSError, KeyError) as err:
        raise DataPrepError(f"{path}: not a HEST patch file with img and barcode ({err})") from None
    return barcodes, niche


def read_patches(path: str | os.PathLike, *, niche: bool = False
                 ) -> tuple[np.ndarray, list[str]] | tuple[np.ndarray, list[str], np.ndarray | None]:
    """(img (N, H, W, 3) uint8 or float32 in [0, 1], barcodes) of a checked HEST patch file; with ``niche=True``
    also its ``niche_img`` (None when the file has none)."""
    import h5py

    barcodes, has_niche = patch_file_info(path)
    with h5py.File(path, "r") as f:
        arrays = [f[k][()] for k in ("img", "niche_img") if k == "img" or (niche and has_niche)]
    img, *rest = [a if a.dtype == np.uint8 else a.astype(np.float32) for a in arrays]
    if niche:
        return img, barcodes, (rest[0] if rest else None)
    return img, barcodes


def write_patches(path: str | os.PathLike, img: np.ndarray, barcodes: Sequence[str], coords: np.ndarray, *,
                  niche: np.ndarray | None = None) -> Path:
    """Write a HEST patch file (``img``, ``barcode``, ``coords``; ``niche_img`` when ``niche`` is given)."""
    import h5py

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["img"] = np.asarray(img, np.uint8)
        f["barcode"] = np.asarray([str(b).encode() for b in barcodes])[:, None]
        f["coords"] = np.asarray(coords)
        if niche is not None:
            f["niche_img"] = np.asarray(niche, np.uint8)
    return path


def export_task(shards: str | os.PathLike, out: str | os.PathLike, *, genes: Sequence[str] | None = None) -> Path:
    """A HEST-Bench task folder from a shards folder: spot crops as patch files (niche crops as their
    ``niche_img``, which HEST ignores and ``model:`` encoders use), expression as AnnData whose
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
        write_patches(out / "patches" / f"{sid}.h5", shard["spot_patches"], shard["barcodes"], shard["coords_px"],
                      niche=shard["niche_patches"])
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
