"""HDF5 shards (one per slide) and ``manifest.json``; see docs/ARCHITECTURE.md "Shards".

A shard is written under a temporary name in the same folder and renamed into place only when every
dataset is written and the ``complete`` attribute is set, so a killed run never leaves a half shard
under the final name. The manifest is replaced atomically in the same way.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.errors import DataPrepError
from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path, publish, remove_stale_temporaries, safe_name

FORMAT = "stalign-shards"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
PATCH_GZIP_LEVEL = 1  # deflate level of gzip patch chunks (``patch_compression="gzip"``)
#: How patch chunks are stored: "none" (raw, the default: measured 1.28x larger than gzip level 1 on real H&E
#: crops but ~8x less CPU to write and ~6x less to read, see docs/performance.md) or "gzip" (level 1). Readers
#: need nothing to know: h5py reads both.
PATCH_COMPRESSIONS = ("none", "gzip")
ARRAYS = ("expr", "niche_expr", "coords_px", "coords_um", "neighbors", "padded", "barcodes")


def check_compression(compression: str) -> str:
    """``compression`` if it is one of ``PATCH_COMPRESSIONS``, else a one-line ``DataPrepError`` (a ``ValueError``)."""
    if compression not in PATCH_COMPRESSIONS:
        raise DataPrepError(f"patch compression must be one of {', '.join(PATCH_COMPRESSIONS)}; got {compression!r}")
    return compression


def encode_patch(patch: np.ndarray, compression: str = "none", level: int = PATCH_GZIP_LEVEL) -> bytes:
    """One (P, P, 3) uint8 crop as the HDF5 chunk ``ShardWriter.write_compressed`` stores: its raw bytes, or
    deflated for ``compression="gzip"``."""
    raw = np.ascontiguousarray(patch, dtype=np.uint8).tobytes()
    if check_compression(compression) == "none":
        return raw
    import zlib

    return zlib.compress(raw, level)


class ShardError(DataPrepError):
    """A shard or manifest that is missing, incomplete or does not match."""


def shard_relpath(slide_id: str) -> str:
    """Path of a slide's shard relative to the output folder (a slide id that is not one plain file name, e.g.
    ``../../X``, is refused: a shard is never written outside its folder)."""
    return f"{SHARD_DIR}/{safe_name(slide_id, 'slide_id')}.h5"


class ShardWriter:
    """Write one slide's shard: ``with ShardWriter(...) as w: w.write_patches(...); w.finish(...)``.

    The file lives under a temporary name until ``finish`` succeeds; leaving the block without
    ``finish`` (an exception, a kill) removes it and the final name is never touched.
    """

    def __init__(self, path: str | os.PathLike, *, slide_id: str, n_spots: int, patch_px: int,
                 genes: Sequence[str], um_per_px: float, attrs: dict[str, Any] | None = None,
                 gzip_level: int = PATCH_GZIP_LEVEL, compression: str = "none") -> None:
        if n_spots < 1:
            raise ShardError(f"{path}: a shard needs at least one spot")
        self.path = Path(path)
        self.n_spots, self.patch_px, self.n_genes = int(n_spots), int(patch_px), len(genes)
        self._meta = {"slide_id": slide_id, "um_per_px": float(um_per_px),
                      "genes": np.asarray(list(genes), dtype=object), **(attrs or {})}
        self._gzip_level = int(gzip_level)
        self.compression = check_compression(compression)
        self._file = None
        self._tmp: Path | None = None

    def __enter__(self) -> ShardWriter:
        import h5py

        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.{os.getpid()}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._file = h5py.File(self._tmp, "w")
        p, n = self.patch_px, self.n_spots
        codec = {"compression": "gzip", "compression_opts": self._gzip_level} if self.compression == "gzip" else {}
        for name in ("spot_patches", "niche_patches"):
            self._file.create_dataset(name, shape=(n, p, p, 3), dtype=np.uint8, chunks=(1, p, p, 3), **codec)
        return self

    def write_patches(self, start: int, spot: np.ndarray, niche: np.ndarray) -> None:
        """Store spot/niche crops (B, P, P, 3) uint8 for spots ``start .. start+B``."""
        stop = start + len(spot)
        self._file["spot_patches"][start:stop] = spot
        self._file["niche_patches"][start:stop] = niche

    def write_compressed(self, rows: Sequence[int], spot: Sequence[Any], niche: Sequence[Any]) -> None:
        """Store crops already encoded by ``encode_patch`` (with this writer's ``compression`` and ``gzip_level``)
        as they are: any deflate runs in the worker processes, the single writer only copies bytes. For raw
        storage a chunk may be any C-contiguous (P, P, 3) uint8 buffer (a crop array, a view of shared memory)."""
        spot_id, niche_id = self._file["spot_patches"].id, self._file["niche_patches"].id  # looked up once
        for row, a, b in zip(rows, spot, niche):
            spot_id.write_direct_chunk((int(row), 0, 0, 0), a)
            niche_id.write_direct_chunk((int(row), 0, 0, 0), b)

    def set_attr(self, key: str, value: Any) -> None:
        """An extra HDF5 attribute, written by ``finish``."""
        self._meta[key] = value

    def finish(self, *, expr: np.ndarray, niche_expr: np.ndarray, coords_px: np.ndarray,
               coords_um: np.ndarray, neighbors: np.ndarray, padded: np.ndarray,
               barcodes: Sequence[str]) -> Path:
        """Write the per-spot arrays and attributes, close, and rename into place."""
        import h5py

        f, n = self._file, self.n_spots
        arrays = {
            "expr": self._expression(expr, "expr"), "niche_expr": self._expression(niche_expr, "niche_expr"),
            "coords_px": np.asarray(coords_px, dtype=np.float64), "coords_um": np.asarray(coords_um, dtype=np.float32),
            "neighbors": np.asarray(neighbors, dtype=np.int32), "padded": np.asarray(padded, dtype=bool),
        }
        for name, arr in arrays.items():
            if len(arr) != n:
                raise ShardError(f"{self.path.name}: {name} has {len(arr)} rows, expected {n}")
            f.create_dataset(name, data=arr)
        if len(barcodes) != n:
            raise ShardError(f"{self.path.name}: {len(barcodes)} barcodes, expected {n}")
        f.create_dataset("barcodes", data=np.asarray([str(b) for b in barcodes], dtype=object),
                         dtype=h5py.string_dtype())
        for key, value in self._meta.items():
            f.attrs[key] = value
        f.attrs["n_spots"] = n
        f.attrs["complete"] = True
        f.close()
        self._file = None
        publish(self._tmp, self.path)
        self._tmp = None
        return self.path

    def _expression(self, values: np.ndarray, name: str) -> np.ndarray:
        """``values`` as float16 when they fit (log-normalised values do), else float32 (e.g. CPM given as is,
        above float16's 65,504); non-finite values or values beyond float32 are refused naming the slide."""
        arr = np.asarray(values, dtype=np.float64)
        bad = ~np.isfinite(arr)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ShardError(f"slide {self._meta['slide_id']}: {name} holds {int(bad.sum())} NaN/inf values "
                             f"(first at spot {row}); the expression input is damaged")
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if peak > float(np.finfo(np.float32).max):
            raise ShardError(f"slide {self._meta['slide_id']}: {name} holds {peak:g}, beyond what float32 stores")
        return arr.astype(np.float16 if peak <= float(np.finfo(np.float16).max) else np.float32)

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_decode(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def shard_attrs(path: str | os.PathLike) -> dict[str, Any] | None:
    """The attributes of a complete shard, or None when the file is missing, unreadable or incomplete."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: _decode(v) for k, v in f.attrs.items()}
            if not attrs.get("complete") or any(name not in f for name in ARRAYS):
                return None
            return attrs
    except (OSError, KeyError):
        return None


def read_shard(path: str | os.PathLike, *, patches: bool = False) -> dict[str, Any]:
    """All per-spot arrays of a shard (barcodes as str, expression float32) plus ``attrs``;
    ``patches=True`` also loads ``spot_patches``/``niche_patches`` (large)."""
    import h5py

    if not Path(path).exists():
        raise ShardError(f"{path}: shard not found")
    attrs = shard_attrs(path)
    if attrs is None:
        raise ShardError(f"{path}: shard is incomplete or unreadable")
    with h5py.File(path, "r") as f:
        out = {name: f[name][()] for name in ARRAYS + (("spot_patches", "niche_patches") if patches else ())}
    out["attrs"] = attrs
    out["barcodes"] = [_decode(b) for b in out["barcodes"]]
    for name in ("expr", "niche_expr"):
        out[name] = out[name].astype(np.float32)
    return out


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (``atomic_write_path``: a temporary file in the same folder, renamed)."""
    path = Path(out_dir) / MANIFEST
    with atomic_write_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return path


def read_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a shard folder; a clear error when it is missing or not a stalign manifest."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise ShardError(f"{path}: no manifest (run `stalign prep` to create shards)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ShardError(f"{path}: not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path}: manifest version {manifest.get('version')}, this stalign reads {VERSION}")
    _check_entries(manifest, path)
    return manifest


def _check_entries(manifest: dict[str, Any], path: Path) -> None:
    """Each slide entry names its slide (an id that can name a file) and its shard ``shards/<slide_id>.h5``: a
    manifest never sends a reader or an export outside its folder."""
    slides = manifest.get("slides")
    if not isinstance(slides, list) or not all(isinstance(e, dict) for e in slides):
        raise ShardError(f"{path}: 'slides' must be a list of slide entries")
    for i, entry in enumerate(slides):
        if "slide_id" not in entry or "shard" not in entry:
            raise ShardError(f"{path}: slide entry {i + 1} lacks {[k for k in ('slide_id', 'shard') if k not in entry]}")
        try:
            expected = shard_relpath(entry["slide_id"])
        except InputError as err:
            raise ShardError(f"{path}: slide entry {i + 1}: {err}") from None
        if entry["shard"] != expected:
            raise ShardError(f"{path}: slide {entry['slide_id']!r} names shard {entry['shard']!r}; a shard of this "
                             f"folder is {expected!r}")
