"""What every data-preparation entry point (``stalign prep`` and the ``data_prep/*.py`` scripts) shares: the output
and crop options, the call into :func:`~stalign.data.pipeline.prepare` with them, and the per-slide summary table."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from stalign.data.crop_spec import CropSpec
from stalign.data.slide import RESAMPLE_FILTERS
from stalign.data.stain import STAIN_METHODS
from stofm.util.errors import InputError


def add_crop_options(p: argparse.ArgumentParser) -> None:
    """``--spot-um``, ``--niche-um``, ``--patch-px``, ``--resample``, ``--stain-norm``, ``--stain-target``: the
    ``CropSpec`` of a prep (defaults: the existing folder's, else ``CropSpec()``)."""
    d = CropSpec()
    p.add_argument("--spot-um", type=float, default=None, help=f"spot crop width in µm (default {d.spot_um:g})")
    p.add_argument("--niche-um", type=float, default=None, help=f"niche crop width in µm (default {d.niche_um:g})")
    p.add_argument("--patch-px", type=int, default=None,
                   help=f"crops are resampled to this many px (default {d.patch_px})")
    p.add_argument("--resample", choices=RESAMPLE_FILTERS, default=None,
                   help=f"crop resampling filter (default {d.resample}, antialiased). The crop spec is recorded in "
                        "manifest.json and in every checkpoint trained on the shards; predict cuts the same crops. "
                        "Defaults of a re-run: the existing folder's")
    p.add_argument("--stain-norm", choices=STAIN_METHODS, default=None,
                   help="stain normalisation of every crop (default none): macenko maps each crop's stains onto a "
                        "target fitted on --stain-target; recorded in the crop spec, so predict normalises alike")
    p.add_argument("--stain-target", default=None, metavar="SLIDE|auto",
                   help="slides the macenko target is fitted on: one slide id of this prep, or auto (all its "
                        "slides, default)")


def crop_from_args(args: argparse.Namespace) -> CropSpec:
    """The crop spec of ``--out`` with the crop options given on top (the existing manifest's, else the default)."""
    from stalign.data.shards import MANIFEST, read_manifest

    out = Path(args.out) / MANIFEST
    base = (CropSpec.from_dict(read_manifest(out.parent)) if out.is_file() else None) or CropSpec()
    stain = getattr(args, "stain_norm", None)
    target = getattr(args, "stain_target", None)
    if target is not None and (stain or base.stain_norm) == "none":
        raise InputError(f"--stain-target {target} needs --stain-norm macenko")
    return base.with_overrides(spot_um=args.spot_um, niche_um=args.niche_um, patch_px=args.patch_px,
                               resample=args.resample, stain_norm=stain, stain_target=target)


def add_spot_geometry_options(p: argparse.ArgumentParser) -> None:
    """``--spot-diameter-um``, ``--spot-pitch-um``: the spot geometry the pixel-size sources read (readers'
    ``spot_diameter_um``, ``spot_pitch_um``; default: each reader's own, see docs/readers.md)."""
    p.add_argument("--spot-diameter-um", type=float, default=None, metavar="UM",
                   help="µm spanned by spot_diameter_fullres (default 65, Space Ranger's definition; HEST: the "
                        "sample's spot_diameter)")
    p.add_argument("--spot-pitch-um", type=float, default=None, metavar="UM",
                   help="centre-to-centre spot distance for the grid and pitch sources (default 100 for Visium; "
                        "HEST: the sample's inter_spot_dist, e.g. 200 for legacy ST)")


def spot_geometry(args: argparse.Namespace) -> dict[str, float | None]:
    """``spot_diameter_um`` and ``spot_pitch_um`` keywords of the readers from the options above."""
    out = {"spot_diameter_um": args.spot_diameter_um, "spot_pitch_um": args.spot_pitch_um}
    for key, value in out.items():
        if value is not None and not (math.isfinite(value) and value > 0):
            raise InputError(f"--{key.replace('_', '-')} must be a number > 0, got {value}")
    return out


def add_output_options(p: argparse.ArgumentParser, *, gene_file: bool = False) -> None:
    """The options ``stalign prep`` and the ``data_prep/`` scripts share: ``--out``, ``--n-top-genes`` (with
    ``gene_file``: or ``--genes FILE``, prep's), the crop options, ``--um-per-px``, ``--workers``,
    ``--patch-compression``, ``--no-tissue-filter``, ``--quiet``."""
    p.add_argument("--out", required=True, metavar="DIR",
                   help="shard folder (manifest.json + shards/); a re-run into it resumes and skips finished slides")
    genes = p.add_mutually_exclusive_group()
    if gene_file:
        genes.add_argument("--genes", metavar="FILE", help="gene panel: one gene per line ('#' comments)")
    genes.add_argument("--n-top-genes", type=int, default=50, metavar="N",
                       help="gene panel: the top N highly variable genes shared by all slides (default 50)")
    add_crop_options(p)
    p.add_argument("--um-per-px", type=float, default=None, help="pixel size of every slide (overrides metadata)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes reading crops, this one included (default 1; each reads its own run of crop "
                        "batches of each slide, so one big slide uses them all)")
    p.add_argument("--patch-compression", choices=("none", "gzip"), default="none",
                   help="patch storage: none (raw, default: fastest) or gzip (level 1: ~1.3x smaller, ~8x the CPU)")
    p.add_argument("--no-tissue-filter", action="store_true", help="keep spots on background too")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def prepare_from_args(samples: list[Any], args: argparse.Namespace, *, crop: CropSpec | None = None,
                      **options: Any) -> dict[str, Any]:
    """:func:`prepare` the read ``samples`` with the options of :func:`add_output_options` (``crop``: the
    :func:`crop_from_args` already made; ``options``: more keywords of ``prepare``); prints the summary."""
    from stalign.data.pipeline import prepare

    manifest = prepare(samples, args.out, n_top_genes=args.n_top_genes, crop=crop or crop_from_args(args),
                       tissue_filter=not args.no_tissue_filter, progress=not args.quiet,
                       patch_compression=args.patch_compression, workers=args.workers, **options)
    print(summary_table(manifest))
    print(f"{len(manifest['genes'])} genes ({manifest['expression']}), "
          f"{sum(s['n_spots'] for s in manifest['slides'])} spots -> {Path(args.out) / 'manifest.json'}")
    return manifest


def summary_table(manifest: dict[str, Any]) -> str:
    """One line per slide: spots kept, dropped off the image and as background, padded, µm/px and its source."""
    rows = [("slide", "spots", "off-image", "dropped", "padded", "um/px", "pixel size from")]
    for s in manifest["slides"]:
        rows.append((s["slide_id"], str(s["n_spots"]), str(s.get("dropped_out_of_image", {}).get("count", 0)),
                     str(s["n_background_dropped"]), str(s["n_padded"]), f"{s['um_per_px']:.4f}",
                     s["pixel_size_source"]))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return "\n".join("  ".join(c.rjust(w) if 0 < i < 6 else c.ljust(w) for i, (c, w) in
                               enumerate(zip(r, [*widths, 0]))).rstrip() for r in rows)
