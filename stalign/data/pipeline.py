"""``prepare``: slides + expression -> one HDF5 shard per slide + ``manifest.json`` (``stalign prep``).

1. Every slide's expression is read and normalised first, to fix the shared gene panel (a re-run into the
   same folder reuses the manifest's panel; asking for a different one is an error).
2. Slides are then written one after another (``stalign.data.slide_writer``): which spots are on tissue (``stalign.data.tissue_call``: Space
   Ranger's in_tissue call or the image mask; a QC picture and the dropped spots under ``qc/``), niche means,
   neighbours, and the spot and niche
   crops at fixed physical sizes, read in batches of spots by ``workers`` processes ('spawn' pool; each
   process opens the slide itself; raw crops come back in shared memory), so several workers speed up one
   large slide as well as many slides; the pool makes the next slide's tissue mask while this one is written.
   The main process is the only writer; the shard goes under a temporary name, renamed when complete.
3. The manifest is rewritten (atomically) after every finished slide, so a killed run can resume: slides
   whose shard is complete and built from the same source files (sha256) and settings are skipped.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data import expression as ex
from stalign.data.crop_spec import LEGACY_RESAMPLE, CropSpec, fit_stain_target
from stalign.data.errors import DataPrepError
from stalign.data.prep_signals import SIGNALLED, raise_terminated
from stalign.data.sample import GROUP_KEYS, slide_groups
from stalign.data.shards import (
    FORMAT,
    MANIFEST,
    VERSION,
    read_manifest,
    shard_attrs,
    shard_relpath,
    write_manifest,
)
from stalign.data.slide_writer import SlideJob, write_slides
from stalign.data.tissue_call import tissue_rule
from stofm.util.output_paths import take_lock

SETTINGS = ("spot_um", "niche_um", "patch_px", "n_neighbors", "expression", "resample", "stain_norm", "stain_target",
            "stain_matrix", "stain_max")
#: Settings a manifest or shard written before they existed had (read as these values).
LEGACY_SETTINGS = {"resample": LEGACY_RESAMPLE, "stain_norm": "none"}


def _sample(item: Any) -> Any:
    """A ``SlideSample`` from a sample or a zero-argument callable returning one."""
    return item() if callable(item) and not hasattr(item, "adata") else item


def _source_hashes(sample: Any) -> dict[str, str]:
    from stofm.util.safe_files import sha256_of

    resolved = dict.fromkeys(str(Path(p).resolve()) for p in [sample.image_path, *sample.source_files])
    return {p: sha256_of(p) for p in resolved if Path(p).is_file()}


def _panel_request(genes: list[str] | None, n_top_genes: int) -> dict[str, Any]:
    return {"method": "list", "n_genes": len(genes)} if genes is not None else \
        {"method": "highly_variable", "n_top_genes": int(n_top_genes)}


def _check_existing(manifest: dict[str, Any], settings: dict[str, Any], request: dict[str, Any],
                    genes: list[str] | None, out_dir: Path) -> None:
    where = out_dir / MANIFEST
    for key in SETTINGS:
        if manifest.get(key, LEGACY_SETTINGS.get(key)) != settings.get(key):
            raise DataPrepError(f"{where}: existing shards were made with {key}={manifest.get(key)!r}, this run asks "
                                f"for {settings[key]!r}; use another --out folder or the same settings")
    if genes is not None and list(genes) != list(manifest["genes"]):
        raise DataPrepError(f"{where}: the requested gene panel ({len(genes)} genes) differs from the panel of the "
                            f"existing shards ({len(manifest['genes'])} genes); use another --out folder")
    if genes is None and manifest.get("gene_selection") != request:
        raise DataPrepError(f"{where}: existing shards used the gene panel {manifest.get('gene_selection')}, this "
                            f"run asks for {request}; use another --out folder or the same panel")


LOCK_NAME = ".prep.lock"


def prepare(samples: Iterable[Any], out_dir: str | os.PathLike, *, genes: Iterable[str] | None = None,
            n_top_genes: int = 50, crop: CropSpec | None = None, n_neighbors: int = 16, workers: int = 1,
            tissue_filter: bool = True, tissue_from: str = "auto", batch_size: int = 32, progress: bool = True,
            log: Callable[[str], None] | None = None, lock_timeout: float | None = None,
            patch_compression: str = "none") -> dict[str, Any]:
    """Prepare shards for ``samples`` (``SlideSample``s or callables returning one) under ``out_dir``;
    returns the manifest. Raises ``DataPrepError`` naming each slide that failed (the others are kept).

    One prep at a time writes into ``out_dir``: a second one waits for the lock ``out_dir/.prep.lock``
    (``filelock``; released by the OS if the holder dies) for up to ``lock_timeout`` seconds (None: as long as it
    takes), then reads the manifest the first one wrote and adds its slides to it.

    ``crop`` (None: the existing manifest's, else ``CropSpec()``) is recorded in the manifest for every later reader
    of the crops (training, checkpoints, prediction on slides); ``patch_compression`` ("none" or "gzip") how patch
    chunks are stored.

    ``tissue_from`` ("auto", "in_tissue", "image"; ``stalign.data.tissue_call``) says which spots are kept:
    Space Ranger's in_tissue call or the image tissue mask (``tissue_filter=False``: every spot); each slide's
    rule, its dropped spots with their reasons and a QC picture are written under ``out_dir/qc/`` and recorded
    in the slide's manifest entry (``tissue``)."""
    out = Path(out_dir)
    log = log or (lambda msg: None)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        lock = take_lock(out / LOCK_NAME, holder=f"{out}: another stalign prep is still writing here",
                         wait=lock_timeout, error=DataPrepError,
                         on_wait=lambda: log(f"{out}: another stalign prep is writing here; waiting for it to finish"))
        handler = None
        if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds (temporaries removed)
            SIGNALLED.clear()
            handler = signal.signal(signal.SIGTERM, raise_terminated)
        try:
            return _prepare_locked(samples, out, genes=genes, n_top_genes=n_top_genes, crop=crop,
                                   n_neighbors=n_neighbors, workers=workers, tissue_filter=tissue_filter,
                                   tissue_from=tissue_from, batch_size=batch_size, progress=progress, log=log,
                                   patch_compression=patch_compression)
        finally:
            lock.release()
            if handler is not None:
                signal.signal(signal.SIGTERM, handler)
    except BaseException:
        if created and {p.name for p in out.iterdir()} <= {LOCK_NAME}:  # a folder this run made, left empty
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _prepare_locked(samples: Iterable[Any], out: Path, *, genes: Iterable[str] | None, n_top_genes: int,
                    crop: CropSpec | None, n_neighbors: int, workers: int, tissue_filter: bool, tissue_from: str,
                    batch_size: int,
                    progress: bool, log: Callable[[str], None], patch_compression: str) -> dict[str, Any]:
    from stalign import __version__
    from stalign.data.shards import check_compression

    if n_neighbors < 1 or workers < 1:
        raise DataPrepError("n_neighbors and workers must be positive")
    if crop is not None and not isinstance(crop, CropSpec):
        raise DataPrepError(f"crop must be a CropSpec, got {type(crop).__name__}")
    existing = read_manifest(out) if (out / MANIFEST).exists() else None
    crop = crop or CropSpec.from_dict(existing) or CropSpec()
    check_compression(patch_compression)
    samples = [_sample(s) for s in samples]
    if not samples:
        raise DataPrepError("no slides to prepare")
    ids = [s.slide_id for s in samples]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataPrepError(f"slide ids must be unique; repeated: {dup}")
    crop = fit_stain_target(crop, samples, previous=CropSpec.from_dict(existing))  # macenko: the target

    # 1. expression of every slide -> mode and the shared panel
    normed, slide_genes, variances, modes = {}, {}, {}, {}
    for s in samples:
        src = f"{s.slide_id} ({_expr_source(s)})"
        slide_genes[s.slide_id] = ex.check_gene_names(s.adata.var_names, source=src)
        normed[s.slide_id], modes[s.slide_id] = ex.normalise_adata(s.adata, source=src)
        variances[s.slide_id] = ex.gene_variance(normed[s.slide_id])
    if len(set(modes.values())) > 1:
        raw = sorted(k for k, v in modes.items() if v == ex.LOG1P_CP10K)
        given = sorted(k for k, v in modes.items() if v == ex.AS_GIVEN)
        raise DataPrepError(f"slides mix raw counts ({raw}) and already-normalised expression ({given}); "
                            "give all slides as raw counts or all normalised")
    settings = {**LEGACY_SETTINGS, **crop.to_dict(), "n_neighbors": int(n_neighbors),
                "expression": next(iter(modes.values()))}
    user_genes = None if genes is None else [str(g) for g in genes]
    request = _panel_request(user_genes, n_top_genes)
    if existing is not None:
        _check_existing(existing, settings, request, user_genes, out)
        panel = ex.select_panel(slide_genes, genes=existing["genes"])
    else:
        panel = ex.select_panel(slide_genes, genes=user_genes, variances=variances, n_top_genes=n_top_genes)
    manifest = {"format": FORMAT, "version": VERSION, "stalign_version": __version__, "genes": panel,
                "gene_selection": request, **settings, "patch_compression": patch_compression,
                "versions": _versions(), "slides": []}
    entries = {e["slide_id"]: e for e in (existing or {}).get("slides", [])
               if shard_attrs(out / e["shard"]) is not None}

    # 2. jobs for the slides whose shard is missing or stale
    groups = {s.slide_id: slide_groups(s) for s in samples}  # patient / site: the manifest's, not the shard's
    jobs = []
    rules = {s.slide_id: tissue_rule(s, tissue_from, tissue_filter=tissue_filter) for s in samples}
    for s in samples:
        hashes = _source_hashes(s)
        path = out / shard_relpath(s.slide_id)
        attrs = shard_attrs(path)
        old_entry = json.loads(attrs.get("manifest_entry", "{}")) if attrs is not None else {}
        if attrs is not None and old_entry.get("source_files") == hashes \
                and old_entry.get("tissue", {}).get("rule") == rules[s.slide_id].rule \
                and attrs.get("genes") == panel \
                and {**LEGACY_SETTINGS, **json.loads(attrs.get("settings", "{}"))} == settings:
            entries[s.slide_id] = json.loads(attrs["manifest_entry"])
            log(f"{s.slide_id}: shard complete, skipped")
            continue
        entries.pop(s.slide_id, None)
        _warn_upsampling(s, crop)
        cols = ex.panel_columns(slide_genes[s.slide_id], panel)
        jobs.append(SlideJob(slide_id=s.slide_id, image_path=os.fspath(s.image_path), **s.pixel_size_record(),
                             coords_px=np.asarray(s.coords_px, dtype=np.float64),
                             expr=ex.dense(normed[s.slide_id][:, cols]),
                             barcodes=[str(b) for b in s.adata.obs_names],
                             source_files=hashes, shard_path=os.fspath(path), genes=panel, settings=settings,
                             tissue=rules[s.slide_id],
                             batch_size=batch_size, progress=progress, compression=patch_compression,
                             dropped_out_of_image=s.dropped_out_of_image))
    del normed

    def save() -> None:
        order = [i for i in ids if i in entries] + [i for i in entries if i not in ids]
        manifest["slides"] = [_with_groups(entries[i], groups.get(i)) for i in order]
        write_manifest(out, manifest)

    def done(entry: dict[str, Any]) -> None:
        entries[entry["slide_id"]] = entry
        save()
        log(f"{entry['slide_id']}: {entry['n_spots']} spots written")
        log(f"{entry['slide_id']}: {entry['tissue']['summary']}; QC picture {out / entry['tissue']['qc_picture']}")

    if entries or existing is not None:  # a first run writes its manifest with its first finished slide
        save()
    failures = write_slides(jobs, workers=workers, progress=progress, on_done=done)
    if failures:
        if len(failures) == 1:
            raise failures[0]
        raise DataPrepError(f"{len(failures)} slides failed:\n" + "\n".join(f"  {f}" for f in failures))
    return manifest


def _with_groups(entry: dict[str, Any], groups: dict[str, str] | None) -> dict[str, Any]:
    """The entry with this run's patient / site (``None``: an earlier run's slide, kept); a new label re-crops nothing."""
    if groups is None:
        return entry
    return {**{k: v for k, v in entry.items() if k not in GROUP_KEYS}, **groups}


#: Crops resampled up by more than this from the source pixels (e.g. lowres-only Visium) get a warning.
MAX_UPSAMPLING = 4.0


def _warn_upsampling(sample: Any, crop: CropSpec) -> None:
    """One warning per slide whose spot crop is enlarged more than ``MAX_UPSAMPLING`` times from its pixels."""
    import warnings

    spot_um, patch_px = crop.spot_um, crop.patch_px
    factor = patch_px / (spot_um / float(sample.um_per_px))
    if factor > MAX_UPSAMPLING:
        warnings.warn(f"{sample.slide_id}: spot crops are upsampled {factor:.1f}x from {sample.image_path} "
                      f"({spot_um:g} µm = {spot_um / float(sample.um_per_px):.0f} px -> {patch_px} px); the image "
                      "holds little detail at this size (a lowres image? give the full-resolution one)", stacklevel=3)


def _expr_source(sample: Any) -> str:
    names = [os.fspath(f) for f in sample.source_files if not os.fspath(f).endswith(os.fspath(sample.image_path))]
    return names[0] if names else "expression"


def _versions() -> dict[str, str]:
    """Versions of Python and of the packages that read the inputs and write the shards."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for dist in ("numpy", "scipy", "h5py", "anndata", "openslide-python", "openslide-bin", "pillow", "tifffile"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return out
