"""Shard embeddings through the feature store (``stalign.data.feature_store``): the encoder identities of models
and encoder specs, with which the store reuses per-shard embeddings.

``embed_shards`` (reference banks of ``predict``/``retrieve``, few-shot, the ablation's measures) and ``bench``'s
encoder features go through ``FeatureStore.per_shard``: each shard's arrays are read from the store when an entry with the
same key exists, else computed for that shard alone and stored. ``cache=False`` (``--no-cache``) computes
everything and touches no file.

The weights checksum of an encoder spec needs the encoder built and hashed (seconds for a large model, and the
imports of timm); :func:`spec_weights_sha256` records it in ``$STALIGN_CACHE/features/weights_sha256.json``, keyed
by the spec, its architecture and seed, the size and mtime of the files its weights are read from, the source code
of ``stalign.models`` and the torch/timm versions, so a run whose features are all stored builds no encoder. Specs
whose weight files are not known without building them (hub downloads) are built and hashed on every run.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stalign.data.feature_store import FeatureStore, module_weights_sha256

__all__ = ["FeatureStore", "baseline_identity", "model_identity", "open_store", "spec_identity", "spec_weights_sha256"]

#: Bumped when the model-free features (``stalign.tasks.baselines.colour_features``, ...) change their numbers.
BASELINE_VERSION = 1
#: Weights checksums the memo of :func:`spec_weights_sha256` keeps (the newest; an old one is only hashed again).
MEMO_ENTRIES = 256
#: Encoder specs whose pretrained weights are a checksum-pinned ``stalign.data.fetch`` data set (spec -> data set).
FETCHED_WEIGHTS = {"efficientnet-lite0": "efficientnet-lite0"}


def open_store(root: str | os.PathLike, cache: bool | FeatureStore = True) -> FeatureStore:
    """The store of the shards under ``root`` (``cache``: a store to share between calls, or on/off)."""
    if isinstance(cache, FeatureStore):
        return cache
    return FeatureStore(root, enabled=bool(cache))


def _weights(module: Any) -> str:
    """The saved checkpoint's sha256 (``model.meta['weights_sha256']``, as banks record it), else the sha256 of the
    module's state dict."""
    return (getattr(module, "meta", None) or {}).get("weights_sha256") or module_weights_sha256(module)


def _precision(device: str, precision: str) -> str:
    from stalign.models.perf import autocast_dtype

    dtype = autocast_dtype(device, precision)
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


def model_identity(model: Any, *, device: str, precision: str = "auto", **settings: Any) -> dict[str, Any]:
    """The encoder identity of a stalign model's embeddings (its weights checksum, the inference precision on
    ``device``, and ``settings`` such as the niche weight)."""
    meta = getattr(model, "meta", None) or {}
    return {"kind": "stalign", "name": meta.get("name"), "weights_sha256": _weights(model),
            "precision": _precision(device, precision), **settings}


def spec_identity(spec: str, weights_sha256: str, *, device: str, arch: str | None = None, seed: int | None = None,
                  precision: str = "auto") -> dict[str, Any]:
    """The encoder identity of a ``bench`` encoder spec: the spec, its architecture and seed, and the sha256 of the
    weights it runs with (from :func:`spec_weights_sha256`; ``model:`` / ``backbone:`` specs by their weights
    alone, not the checkpoint's path)."""
    kind = spec.partition(":")[0]
    return {"kind": "spec", "spec": kind if kind in ("model", "backbone") else spec, "arch": arch, "seed": seed,
            "weights_sha256": weights_sha256,
            "precision": _precision(device, precision)}


def _weight_files(spec: str, arch: str | None) -> list[Path] | None:
    """The files the weights of encoder ``spec`` are read from, when known without building it (none for a random
    init; a local weights file; a fetched data set's files); None when not known."""
    from stalign.models.backbones import is_local_checkpoint, resolve_weights_file
    from stalign.models.image_encoders import ALIASES

    kind, _, rest = spec.partition(":")
    if kind == "random":
        return []
    for path in (spec, rest):
        if path and is_local_checkpoint(path) and Path(path).exists():
            return [resolve_weights_file(path)]
    name = FETCHED_WEIGHTS.get(ALIASES.get(spec, spec))
    if name is None or arch is not None:
        return None
    from stalign.data.fetch import fetch

    return sorted(p for p in fetch(name).iterdir() if p.is_file())


def _code_fingerprint() -> list[Any]:
    """What else decides the weights a spec builds: the sha256 of stalign.models' source files and the versions of
    torch and timm."""
    from importlib.metadata import PackageNotFoundError, version

    import stalign.models

    versions = []
    for package in ("torch", "timm"):
        try:
            versions.append(version(package))
        except PackageNotFoundError:
            versions.append(None)
    here = Path(stalign.models.__file__).parent
    code = hashlib.sha256()
    for p in sorted(here.glob("*.py")):
        code.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return [versions, code.hexdigest()]


def spec_weights_sha256(spec: str, *, arch: str | None, seed: int | None, build: Callable[[], Any]) -> str:
    """The weights checksum of encoder ``spec`` (see module doc): recorded, else ``build()`` (the module) hashed
    and recorded."""
    from stalign.data.fetch import cache_dir

    files = _weight_files(spec, arch)
    if files is None:
        return module_weights_sha256(build())
    key = hashlib.sha256(json.dumps({"spec": spec, "arch": arch, "seed": seed, "code": _code_fingerprint(), "files": [
        (str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]}).encode()).hexdigest()
    memo = cache_dir() / "features" / "weights_sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = module_weights_sha256(build())
    try:  # a lost race or an unwritable cache only means hashing again next time
        from stofm.util.output_paths import atomic_write_path

        kept = list((known if isinstance(known, dict) else {}).items())[-(MEMO_ENTRIES - 1):]  # the newest
        with atomic_write_path(memo) as tmp:
            tmp.write_text(json.dumps({**dict(kept), key: digest}, indent=1))
    except OSError:
        pass
    return digest


def baseline_identity(kind: str, *, imagenet: bool = False) -> dict[str, Any]:
    """The identity of model-free features (``kind``: colour statistics, ...; ``imagenet``: with the frozen ImageNet
    EfficientNet-Lite0 features, whose weights checksum it includes)."""
    identity: dict[str, Any] = {"kind": kind, "version": BASELINE_VERSION, "imagenet": imagenet}
    if imagenet:
        from stalign.models.image_encoders import create_image_encoder

        identity["weights_sha256"] = spec_weights_sha256(
            "efficientnet-lite0", arch=None, seed=None,
            build=lambda: create_image_encoder("efficientnet-lite0", pretrained=True))
    return identity

