"""Shared fixtures: real data locations and device markers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def squidpy_crop() -> Path:
    """Folder with the real Visium crop (test_data.h5ad, test_img.jpg)."""
    from data_prep.fetch import squidpy_crop_dir

    return squidpy_crop_dir()


@pytest.fixture(scope="session")
def fetched():
    """``fetched(name)`` -> folder of a data set from ``data_prep.fetch.DATASETS`` (downloaded once, cached)."""
    from data_prep.fetch import fetch

    return fetch


@pytest.fixture()
def subprocess_env() -> dict:
    """Environment for child processes that must import this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env
