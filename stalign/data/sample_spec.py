"""A slide input named by a few keys: a row of ``stalign prep --samples`` (CSV/YAML), or a one-line spec such as
``"h5ad=my_slide.h5ad image=scan.tif"`` (the tutorials' ``STALIGN_INPUT``).

Keys: ``h5ad`` + ``image`` (AnnData + image), ``spaceranger`` [+ ``image``] (a Space Ranger ``outs`` folder),
``hest`` + ``id`` (a HEST-1k root and sample id), ``visium_hd`` [+ ``image``, ``bin_um``]; optional
``slide_id``, ``um_per_px`` and the slide's groups ``patient`` and ``site`` (``SlideSample.groups``: into the
manifest entry, for ``stalign bench --by patient / site``). One dispatch to the readers of :mod:`stalign.data.readers` for prep and the
notebooks.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError

#: The keys a spec may hold.
SPEC_KEYS = ("h5ad", "image", "spaceranger", "hest", "id", "visium_hd", "bin_um", "slide_id", "um_per_px",
             "patient", "site")
#: The keys whose values are paths.
PATH_KEYS = ("h5ad", "image", "spaceranger", "hest", "visium_hd")
#: What a spec must name, for the error message.
NEEDS = "h5ad+image, spaceranger, visium_hd, or hest+id"


def check_sample_spec(row: dict[str, Any], where: str) -> None:
    """Refuse a spec that names no reader input (``where``: the file and row, for the message)."""
    if not (row.get("h5ad") and row.get("image")) and not row.get("spaceranger") \
            and not (row.get("hest") and row.get("id")) and not row.get("visium_hd"):
        raise InputError(f"{where} needs {NEEDS}; got {sorted(row)}")


def parse_sample_spec(text: str, *, what: str = "slide input") -> dict[str, str]:
    """``"key=value key=value"`` (shell quoting for values with spaces) as a checked dict."""
    row: dict[str, str] = {}
    for part in shlex.split(text):
        key, sep, value = part.partition("=")
        if not sep or key not in SPEC_KEYS:
            raise InputError(f"{what} {text!r}: {part!r} is not KEY=VALUE with KEY one of {', '.join(SPEC_KEYS)}")
        row[key] = value
    check_sample_spec(row, f"{what} {text!r}")
    return row


def spec_paths(row: dict[str, Any], base: str | os.PathLike | None = None) -> dict[str, str]:
    """The path values of ``row`` (``PATH_KEYS``, ``~`` expanded) joined onto ``base``."""
    return {k: str(Path(base or ".") / Path(str(v)).expanduser()) for k, v in row.items()
            if k in PATH_KEYS and v not in (None, "")}


def read_sample_table(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a CSV or YAML slide list (``stalign prep --samples``) as checked specs, their paths relative to the
    list's folder."""
    import csv

    from stofm.util.config_io import parse_yaml
    from stofm.util.output_paths import safe_name
    from stofm.util.safe_files import require_path

    path = require_path(path, "slide list")
    if path.suffix.lower() in (".yaml", ".yml"):
        rows = parse_yaml(path, what="slide list")
        rows = rows.get("slides", rows) if isinstance(rows, dict) else rows
    else:
        with open(path, newline="") as fh:
            rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(fh)]
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{path}: expected a non-empty list of slides (CSV with a header, or a YAML list)")
    for i, row in enumerate(rows):
        for key in ("slide_id", "id"):  # both become file names (shards/<id>.h5, qc/<id>.png)
            if row.get(key):
                safe_name(row[key], f"row {i + 1} {key}", source=path)
        row.update(spec_paths(row, path.parent))
        check_sample_spec(row, f"{path}: row {i + 1}")
    return rows


def _value(row: dict[str, Any], key: str, default: Any = None) -> Any:
    value = row.get(key)
    return default if value in (None, "") else value


def read_sample_spec(row: dict[str, Any], *, base: str | os.PathLike | None = None, um_per_px: float | None = None,
                     bin_um: int | None = None, tissue_from: str = "in_tissue", spot_diameter_um: float | None = None,
                     spot_pitch_um: float | None = None, **common: Any) -> Any:
    """The ``SlideSample`` of a spec (paths relative to ``base``); ``um_per_px``/``bin_um`` unless the row sets
    them; ``tissue_from`` for Space Ranger / Visium HD; ``spot_diameter_um``/``spot_pitch_um`` for the
    pixel-size sources; ``common``: the readers' shared options (``pixel_size_from``, ``crop_um``, ...)."""
    from stalign.data import readers
    from stalign.data.sample import GROUP_KEYS

    check_sample_spec(row, "slide input")
    paths = spec_paths(row, base)
    mpp = _value(row, "um_per_px", um_per_px)
    mpp = float(mpp) if mpp is not None else None
    geom = {"spot_diameter_um": spot_diameter_um, "spot_pitch_um": spot_pitch_um}
    kw = dict(common, um_per_px=mpp)
    slide_id = str(row["slide_id"]) if row.get("slide_id") else None
    if paths.get("hest"):  # a HEST sample's slide id is its sample id
        sample = readers.read_hest(paths["hest"], str(row["id"]), **geom, **kw)
    elif paths.get("visium_hd"):
        from stalign.data.visium_hd import read_visium_hd

        sample = read_visium_hd(paths["visium_hd"], image=paths.get("image"), bin_um=_value(row, "bin_um", bin_um),
                                tissue_from=tissue_from, slide_id=slide_id, **kw)
    elif paths.get("spaceranger"):
        sample = readers.read_spaceranger(paths["spaceranger"], image=paths.get("image"), tissue_from=tissue_from,
                                          slide_id=slide_id, **geom, **kw)
    else:
        sample = readers.read_anndata_image(paths["h5ad"], paths["image"], slide_id=slide_id, **geom, **kw)
    sample.groups.update({k: str(row[k]).strip() for k in GROUP_KEYS if str(row.get(k) or "").strip()})
    return sample
