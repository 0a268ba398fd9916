"""stalign: predict spatial gene expression from H&E (ST-Align alignment + SToFM gene/spatial encoder).

Heavy modules (torch, timm, anndata) load lazily, so ``import stalign`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "stalign.models.factory",
    "list_models": "stalign.models.factory",
    "load_checkpoint": "stalign.models.factory",
    "save_checkpoint": "stalign.models.factory",
    "STAlign": "stalign.models.stalign_model",
    "ThreeTargetLoss": "stalign.training.losses",
    "create_image_encoder": "stalign.models.image_encoders",
    "push_to_hub": "stalign.models.hub",
    "StalignError": "stofm.util.errors",  # base of every user-facing error (docs/ARCHITECTURE.md, Errors)
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stalign' has no attribute {name!r}")
