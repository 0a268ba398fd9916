"""Shard embeddings through the feature store (``stalign.data.feature_store``): the encoder identities of models
and encoder specs, and per-shard embedding with reuse.

``embed_shards`` (reference banks of ``predict``/``retrieve``, few-shot, the ablation's measures) and ``bench``'s
encoder features go through :func:`per_shard`: each shard's arrays are read from the store when an entry with the
same key exists, else computed for that shard alone and stored. ``cache=False`` (``--no-cache``) computes
everything and touches no file.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from stalign.data.feature_store import FeatureStore, module_weights_sha256

__all__ = ["FeatureStore", "baseline_identity", "model_identity", "open_store", "per_shard", "spec_identity"]

#: Bumped when the model-free features (``stalign.tasks.baselines.colour_features``, ...) change their numbers.
BASELINE_VERSION = 1


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


def spec_identity(spec: str, net: Any, *, device: str, arch: str | None = None, seed: int | None = None,
                  precision: str = "auto") -> dict[str, Any]:
    """The encoder identity of a ``bench`` encoder spec: the spec, its architecture and seed, and the sha256 of the
    weights it runs with (``model:``/``backbone:`` specs by their weights alone, not the checkpoint's path)."""
    kind = spec.partition(":")[0]
    return {"kind": "spec", "spec": kind if kind in ("model", "backbone") else spec, "arch": arch, "seed": seed,
            "weights_sha256": _weights(net),
            "precision": _precision(device, precision)}


def baseline_identity(kind: str, *, imagenet: bool = False) -> dict[str, Any]:
    """The identity of model-free features (``kind``: colour statistics, ...; ``imagenet``: with the frozen ImageNet
    EfficientNet-Lite0 features, whose weights checksum it includes)."""
    identity: dict[str, Any] = {"kind": kind, "version": BASELINE_VERSION, "imagenet": imagenet}
    if imagenet:
        from stalign.models.image_encoders import create_image_encoder

        identity["weights_sha256"] = module_weights_sha256(create_image_encoder("efficientnet-lite0",
                                                                                pretrained=True))
    return identity


def per_shard(store: FeatureStore, identity: Mapping[str, Any], outputs: Sequence[str], slide_ids: Sequence[str],
              compute: Callable[[str], Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``outputs`` of every shard in ``slide_ids`` (concatenated in that order): read from ``store``, else
    ``compute(slide_id)`` (one row per spot of that shard) and stored."""
    parts = [store.arrays(identity, list(outputs), str(sid), lambda sid=sid: compute(str(sid))) for sid in slide_ids]
    return {out: np.concatenate([p[out] for p in parts]) for out in outputs}
