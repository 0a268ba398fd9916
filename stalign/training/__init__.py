"""``stalign train``: run configs, optimiser/schedule, the accelerate training loop, retrieval metrics, logs.

``train_from_config("configs/demo.yaml", max_steps=50)`` trains from Python; heavy imports load lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "stalign.training.config",
    "resolve_config": "stalign.training.config",
    "train": "stalign.training.trainer",
    "train_from_config": "stalign.training.trainer",
    "TrainResult": "stalign.training.trainer",
    "NonFiniteLossError": "stofm.util.errors",
    "retrieval_metrics": "stalign.training.metrics",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stalign.training' has no attribute {name!r}")
