"""The feature store: per-shard arrays (image embeddings, features) computed once and read back by every later run.

An entry is one array of one shard, keyed by

- the **encoder identity** (a JSON-ready dict: the spec or model name, the sha256 of its weights, and whatever else
  changes the numbers: niche weight, precision, ...; :func:`module_weights_sha256` for encoders without a saved
  checksum),
- the **output** name (``"image"``, ``"gene"``, ``"features"``, ...),
- the shards' **crop spec** (``CropSpec.to_dict()`` of the manifest, every field),
- the **shard checksum** (:func:`shard_checksum`: the file's size and mtime_ns and the sha256 of its manifest
  entry but its patient and site, which change no array; hashing the shard's bytes would cost seconds per GB on
  every run, and prep replaces a shard by a rename, which always gives a new mtime; a copy without its mtime
  misses, the safe direction).

Files (``FOLDER/<slide_id>/<output>-<hash>.npy`` + ``.json`` sidecar with the key, shape and compute time) are
written atomically (``atomic_write_path``); a writer holds ``FOLDER/<slide_id>/.<encoder hash>.lock`` (``take_lock``)
while it computes, so a second process for the same encoder and shard waits and then reads the first one's result.
Writing an entry removes the entries of the same encoder and output whose crop spec or shard checksum differ (they
can never be read again). ``FOLDER`` is ``ROOT/features`` beside the shards, or, where that folder cannot be
written, ``$STALIGN_CACHE/features/<sha256 of ROOT's path>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.sample import GROUP_KEYS
from stalign.data.shards import read_manifest
from stofm.util.output_paths import atomic_write_path, take_lock

FORMAT = "stalign-features"
VERSION = 1
#: How long a writer waits for another process computing the same entry (seconds; None = as long as it takes).
LOCK_WAIT: float | None = None


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def module_weights_sha256(module: Any) -> str:
    """sha256 over a torch module's ``state_dict`` (names, dtypes, shapes and bytes, in order): the weights
    checksum of an encoder that has no saved file checksum (a pretrained spec, a random init of a seed)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def shard_checksum(root: str | os.PathLike, entry: Mapping[str, Any]) -> dict[str, Any]:
    """The shard's identity: slide id, file size, mtime_ns and the sha256 of its manifest entry (see module doc)."""
    st = (Path(root) / entry["shard"]).stat()
    return {"slide_id": str(entry["slide_id"]), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "entry_sha256": _digest({k: v for k, v in entry.items() if k not in GROUP_KEYS})}


def manifest_crop(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The full crop-spec dict of a manifest (every ``CropSpec`` field, stain normalisation included)."""
    from stalign.data.crop_spec import CropSpec

    spec = CropSpec.from_dict(manifest)
    return spec.to_dict() if spec is not None else {k: manifest.get(k) for k in ("spot_um", "niche_um", "patch_px")}


def _writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def store_folder(root: str | os.PathLike) -> Path:
    """Where the features of the shards under ``root`` live (see module doc)."""
    from stalign.data.fetch import cache_dir

    root = Path(root)
    beside = root / "features"
    if _writable(beside):
        return beside
    return cache_dir() / "features" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]


class FeatureStore:
    """The features of one shards folder (``enabled=False``: every array is computed, nothing read or written —
    ``--no-cache``). ``hits`` / ``computed`` count the shard arrays reused and computed by this object."""

    def __init__(self, root: str | os.PathLike, *, enabled: bool = True, folder: str | os.PathLike | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.enabled = enabled
        self.folder = Path(folder) if folder is not None else store_folder(self.root)
        self.crop = manifest_crop(self.manifest)
        self.entries = {str(e["slide_id"]): e for e in self.manifest["slides"]}
        self.hits = self.computed = 0
        self.log = log or (lambda message: print(message, file=sys.stderr))

    def key(self, encoder: Mapping[str, Any], output: str, slide_id: str) -> dict[str, Any]:
        """The full key of one entry (JSON-ready)."""
        key = {"format": FORMAT, "version": VERSION, "encoder": dict(encoder), "output": output,
               "crop": self.crop, "shard": shard_checksum(self.root, self.entries[slide_id])}
        return json.loads(json.dumps(key, sort_keys=True, default=str))  # as the sidecar reads back

    def _path(self, key: Mapping[str, Any]) -> Path:
        from stofm.util.output_paths import safe_name

        slide = safe_name(key["shard"]["slide_id"], "slide id", source=self.root / "manifest.json")
        return self.folder / slide / f"{key['output']}-{_digest(key)[:20]}.npy"

    def _read(self, key: Mapping[str, Any]) -> np.ndarray | None:
        path = self._path(key)
        try:
            side = json.loads(path.with_suffix(".json").read_text())
            if side.get("key") != key:
                return None
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None  # missing, half-written by an older version, damaged: computed again
        expected = self.entries[key["shard"]["slide_id"]]["n_spots"]
        return arr if arr.ndim >= 1 and len(arr) == expected else None

    def _write(self, key: Mapping[str, Any], arr: np.ndarray, seconds: float) -> None:
        path = self._path(key)
        arr = np.ascontiguousarray(arr)
        with atomic_write_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        side = {"key": key, "shape": list(arr.shape), "dtype": str(arr.dtype), "seconds": round(seconds, 3),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S")}
        with atomic_write_path(path.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(side, indent=1, default=str))
        self._drop_stale(key, path)

    def _drop_stale(self, key: Mapping[str, Any], keep: Path) -> None:
        """Remove the entries of the same encoder and output for this slide under another crop spec or shard."""
        for side in keep.parent.glob(f"{key['output']}-*.json"):
            if side == keep.with_suffix(".json"):
                continue
            try:
                old = json.loads(side.read_text()).get("key", {})
            except (OSError, ValueError):
                continue
            if old.get("encoder") == key["encoder"]:
                side.with_suffix(".npy").unlink(missing_ok=True)
                side.unlink(missing_ok=True)

    def arrays(self, encoder: Mapping[str, Any], outputs: Sequence[str], slide_id: str,
               compute: Callable[[], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The ``outputs`` of ``encoder`` for one shard: read from the store, else ``compute()`` (a dict holding at
        least ``outputs``, one row per shard spot) under the entry's lock, stored, and returned."""
        if not self.enabled:
            self.computed += 1
            return {k: np.asarray(v) for k, v in compute().items() if k in outputs}
        keys = {out: self.key(encoder, out, slide_id) for out in outputs}
        found = self._read_all(keys)
        if found is not None:
            self.hits += 1
            return found
        lock_file = self._path(keys[outputs[0]]).parent / f".{_digest(dict(encoder))[:20]}.lock"
        lock = take_lock(lock_file, holder=f"another process is computing features of {slide_id}", wait=LOCK_WAIT,
                         on_wait=lambda: self.log(f"waiting for another process computing the features of "
                                                  f"{slide_id} ({lock_file})"))
        try:
            found = self._read_all(keys)  # written by the process we waited for
            if found is not None:
                self.hits += 1
                return found
            start = time.perf_counter()
            result = compute()
            seconds = time.perf_counter() - start
            n_spots = self.entries[slide_id]["n_spots"]
            for out in outputs:
                if len(result[out]) != n_spots:
                    raise ValueError(f"{out} of {slide_id}: {len(result[out])} rows for {n_spots} spots")
            for out, key in keys.items():
                self._write(key, np.asarray(result[out]), seconds)
            self.computed += 1
            return {out: np.asarray(result[out]) for out in outputs}
        finally:
            lock.release()

    def per_shard(self, encoder: Mapping[str, Any], outputs: Sequence[str], slide_ids: Sequence[str],
                  compute: Callable[[str], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """:meth:`arrays` of every shard in ``slide_ids``, concatenated in that order (``compute(slide_id)``: one
        row per spot of that shard)."""
        parts = [self.arrays(encoder, list(outputs), str(s), lambda s=s: compute(str(s))) for s in slide_ids]
        return {out: np.concatenate([p[out] for p in parts]) for out in outputs}

    def _read_all(self, keys: Mapping[str, Mapping[str, Any]]) -> dict[str, np.ndarray] | None:
        found = {}
        for out, key in keys.items():
            arr = self._read(key)
            if arr is None:
                return None
            found[out] = arr
        return found

    def size(self) -> tuple[int, int]:
        """(number of stored arrays, bytes of arrays and sidecars) under the store's folder."""
        if not self.folder.is_dir():
            return 0, 0
        files = [p for p in self.folder.rglob("*") if p.is_file() and p.suffix in (".npy", ".json")
                 and not p.name.startswith(".")]
        return sum(p.suffix == ".npy" for p in files), sum(p.stat().st_size for p in files)

    def summary(self) -> str:
        """One line: what this run reused and computed, and the store's size."""
        if not self.enabled:
            return f"feature store: off (--no-cache); {self.computed} shard(s) embedded"
        n, size = self.size()
        return (f"feature store {self.folder}: {self.hits} shard(s) reused, {self.computed} computed; "
                f"{n} arrays, {size / 2**20:.1f} MiB")


def trainable_image_sides(model: Any) -> list[str]:
    """The sides ("spot", "niche") whose image encoder has a trainable parameter (their features change)."""
    return [side for side in ("spot", "niche")
            if any(p.requires_grad for p in getattr(model, f"{side}_image_encoder").parameters())]


def frozen_image_features(model: Any, store: FeatureStore, *, batch_size: int = 64, device: str = "cpu",
                          progress: bool = False, transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                          tag: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """(N, F) trunk features of every shard spot's ``spot`` and ``niche`` crop (manifest order, i.e. global spot
    index) by ``model``'s image encoders (``model.spot_image_encoder`` / ``niche_image_encoder``, in eval mode, fp32),
    through ``store``: what training with frozen image encoders feeds the model instead of the crops (an
    ``ImageEncoder`` takes a (B, out_dim) float tensor as its features). ``transform`` (a batch dict -> the batch
    with its ``spot_image`` / ``niche_image`` changed, e.g. one seeded augmentation view) runs on each batch of
    uint8 crops first; ``tag`` (JSON-ready) names it in the store's key. Only valid for encoders with no trainable
    parameter."""
    import torch
    from tqdm import tqdm

    from stalign.data.dataset import ShardDataset, collate

    encoders = {"spot": model.spot_image_encoder, "niche": model.niche_image_encoder}
    trainable = trainable_image_sides(model)
    if trainable:
        raise ValueError(f"the {trainable[0]} image encoder trains: its features cannot be stored")
    identity = {"kind": "frozen trunks", **(dict(tag) if tag else {})}
    for side, enc in encoders.items():
        identity[side] = {"spec": enc.spec, "weights_sha256": module_weights_sha256(enc),
                          "preprocess": [getattr(enc, k, None) for k in ("input_size", "interpolation", "crop_pct",
                                                                         "mean", "std")]}

    def compute(slide_id: str) -> dict[str, np.ndarray]:
        loader = torch.utils.data.DataLoader(ShardDataset(store.root, slides=[slide_id]), batch_size=batch_size,
                                             collate_fn=collate)
        was = {side: enc.training for side, enc in encoders.items()}
        rows: dict[str, list[np.ndarray]] = {"spot": [], "niche": []}
        # fork_rng: computing (a store miss) must leave torch's RNG as a hit does, or the run would differ
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            for batch in tqdm(loader, desc=f"image features of {slide_id}", disable=not progress):
                if transform is not None:
                    batch = transform(batch)
                for side, enc in encoders.items():
                    enc.eval().to(device)
                    rows[side].append(enc(batch[f"{side}_image"].to(device)).float().cpu().numpy())
        for side, enc in encoders.items():
            enc.train(was[side])
        return {side: np.concatenate(parts) for side, parts in rows.items()}

    return store.per_shard(identity, ["spot", "niche"], list(store.entries), compute)
