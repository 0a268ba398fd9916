"""stofm: the SToFM gene/spatial foundation encoder (cell encoder + SE(2) transformer + virtual cells).

Heavy modules (torch, anndata) load lazily, so ``import stofm`` stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "create_model": "stofm.model",
    "list_models": "stofm.model",
    "load_model": "stofm.model",
    "SToFM": "stofm.model",
    "embed": "stofm.embedding",
    "embed_niches": "stofm.embedding",
    "virtual_cells": "stofm.virtual_cells",
    "SE2Transformer": "stofm.se2",
    "tile_slide": "stofm.subslice",
    "StalignError": "stofm.util.errors",
    "StofmError": "stofm.util.errors",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stofm' has no attribute {name!r}")
