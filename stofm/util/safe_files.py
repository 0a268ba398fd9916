"""Reading the files a user hands over (JSON configs, safetensors weights and banks, AnnData) so that a damaged or
wrong file is one error naming the file and the problem, never a traceback from deep inside a library and never
silent garbage: loaded float tensors must be finite, and a sha256 recorded at save time is checked."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError
from stofm.util.output_paths import atomic_write_path

PathLike = str | os.PathLike


class DamagedFileError(InputError):
    """A file that exists but cannot be used: truncated, garbage, wrong format, non-finite values, bad checksum."""


def sha256_of(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def require_path(path: PathLike, what: str, *, missing: str = "does not exist", folder_ok: bool = False) -> Path:
    """``path`` as a ``Path``; ``FileNotFoundError`` "PATH: WHAT does not exist" (``missing``) when it is not a file
    (``folder_ok``: not there at all)."""
    path = Path(path)
    if not (path.exists() if folder_ok else path.is_file()):
        raise FileNotFoundError(f"{path}: {what} {missing}")
    return path


def read_json(path: PathLike, *, what: str) -> Any:
    """The parsed JSON of ``path``; ``what`` names the kind of file in errors."""
    path = require_path(path, what, missing="not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DamagedFileError(f"{path}: {what} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except UnicodeDecodeError:
        raise DamagedFileError(f"{path}: {what} is not a text file") from None


def load_tensors(path: PathLike, *, what: str, framework: str = "pt", sha256: str | None = None,
                 finite: bool = True, device: str = "cpu") -> dict[str, Any]:
    """The tensors of a safetensors file (``framework`` "pt" -> torch, "np" -> numpy arrays).

    Raises :class:`DamagedFileError` naming ``path`` when the file is truncated or not safetensors, when its sha256
    differs from ``sha256`` (the digest recorded at save time, if any), or when ``finite`` and a float tensor holds
    NaN/inf (random bytes written into a file's data load without complaint otherwise).
    """
    from safetensors import SafetensorError

    path = require_path(path, what, missing="not found")
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256:
            raise DamagedFileError(f"{path}: {what} is damaged (sha256 {digest[:12]}... differs from the "
                                   f"{sha256[:12]}... recorded when it was saved)")
    try:
        if framework == "np":
            from safetensors.numpy import load_file

            tensors = load_file(str(path))
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise DamagedFileError(f"{path}: {what} is damaged or not a safetensors file ({err})") from None
    if finite:
        bad = sorted(k for k, v in tensors.items() if not _all_finite(v))
        if bad:
            raise DamagedFileError(f"{path}: {what} holds NaN/inf values in {len(bad)} tensor(s) (e.g. {bad[:3]}); "
                                   "the file is damaged")
    return tensors


def read_described_tensors(folder: PathLike, info_name: str, tensor_name: str, *, fmt: str, what: str,
                           framework: str = "pt") -> tuple[dict[str, Any], dict[str, Any]]:
    """(description, tensors) of the JSON description ``info_name`` beside the safetensors file ``tensor_name`` in
    ``folder``: both must be there ("FOLDER: not a WHAT (needs ...)"), the JSON must say ``format: fmt`` and the
    tensors must match the sha256 it records (``sha256`` or ``weights_sha256``) and be finite."""
    info_file, tensor_file = Path(folder) / info_name, Path(folder) / tensor_name
    if not info_file.is_file() or not tensor_file.is_file():
        raise FileNotFoundError(f"{folder}: not a {what} (needs {info_name} and {tensor_name})")
    info = read_json(info_file, what=f"{what} description")
    got = info.get("format") if isinstance(info, dict) else type(info).__name__
    if got != fmt:
        raise DamagedFileError(f"{info_file}: format {got!r} is not {fmt!r}")
    sha = info.get("sha256") or info.get("weights_sha256")
    return info, load_tensors(tensor_file, what=what, framework=framework, sha256=sha)


def write_described_tensors(info_file: PathLike, tensor_file: PathLike, write: Any, info: dict[str, Any], *,
                            key: str = "sha256", indent: int | None = None) -> str:
    """The writer of :func:`read_described_tensors`: ``write(path)`` saves the tensors, then the JSON ``info`` with
    their sha256 under ``key``; each file under a temporary name renamed into place
    (:func:`~stofm.util.output_paths.atomic_write_path`: a crash or a full disk never leaves a half file, at worst
    new tensors beside the old description, which the checksum refuses). Returns the sha256."""
    with atomic_write_path(tensor_file) as tmp:
        write(tmp)
        sha = sha256_of(tmp)
    with atomic_write_path(info_file) as tmp:
        tmp.write_text(json.dumps({**info, key: sha}, indent=indent))
    return sha


def _all_finite(value: Any) -> bool:
    import numpy as np

    if hasattr(value, "is_floating_point"):  # torch
        import torch

        return not value.is_floating_point() or bool(torch.isfinite(value).all())
    arr = np.asarray(value)
    return not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())


def read_h5ad(path: PathLike, *, what: str = "AnnData file") -> Any:
    """``anndata.read_h5ad`` (or ``read_zarr`` for a ``.zarr`` folder) with a damaged file as one error."""
    import anndata as ad

    path = require_path(path, what, folder_ok=True)
    try:
        return ad.read_zarr(path) if path.suffix == ".zarr" or path.is_dir() else ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DamagedFileError(f"{path}: {what} cannot be read as AnnData ({first[:200]})") from None


def load_state_dict(path: PathLike, *, what: str = "SToFM checkpoint") -> dict[str, Any]:
    """Tensors of a safetensors file or a ``torch.save`` state dict (``weights_only=True``: no code runs)."""
    import torch

    path = require_path(path, what, missing="not found")
    if path.suffix == ".safetensors":
        return load_tensors(path, what=what)
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message advises weights_only=False: never do that here
        found = re.search(r"GLOBAL ([\w.]+)|global: ([\w.]+)", str(err))
        name = f" ({next(g for g in found.groups() if g)})" if found else ""
        raise DamagedFileError(f"{path}: {what} holds pickled Python objects besides tensors{name}, which could "
                               "run code when loaded; refused (nothing in it was run). Only plain tensor state dicts "
                               "and safetensors are read: get a safetensors copy from its source") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, ... for damaged files
        raise DamagedFileError(f"{path}: {what} is damaged or not a torch state dict "
                               f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise DamagedFileError(f"{path}: {what} is not a state dict of tensors")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise DamagedFileError(f"{path}: {what} holds NaN/inf values in {bad[:3]}")
    return sd
