"""``stalign data fetch NAME`` and ``stalign data synth ...``."""
from __future__ import annotations

import argparse

from stofm.util.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch real demo data or generate synthetic slides")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    f = dsub.add_parser("fetch", help="download + verify a data set into the cache (works offline once cached)")
    f.add_argument("name", help="data set name (see `stalign data fetch --list`)", nargs="?")
    f.add_argument("--list", action="store_true", help="list the known data sets")
    f.add_argument("--dest", default=None, help="folder to extract into (default: the cache)")
    f.add_argument("--force", action="store_true", help="download again even when cached")
    f.set_defaults(func=_fetch)
    x = dsub.add_parser("export-hest", help="export prepared shards as a HEST-Bench task folder (for --hest-bench)")
    x.add_argument("shards", help="a stalign prep output folder with two or more slides")
    x.add_argument("--out", required=True, help="new task folder (patches/, adata/, splits/, var_50genes.json)")
    x.add_argument("--genes", default=None, help="gene list file (one per line; default: the shards' panel)")
    x.set_defaults(func=_export_hest)
    s = dsub.add_parser("synth", help="generate synthetic slides (pyramidal TIFF + AnnData) with a known "
                                      "image -> expression link")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--n-spots", type=int, default=200, help="spots per slide (Visium hex grid, 100 um pitch)")
    s.add_argument("--um-per-px", type=float, default=0.5, help="level-0 pixel size (default 0.5)")
    s.add_argument("--seed", type=int, default=0, help="seed of the first slide; slide i uses seed+i")
    s.add_argument("--n-genes", type=int, default=200, help="genes per slide (programmes + housekeeping)")
    s.add_argument("--n-classes", type=int, default=4, help="tissue classes (1-6)")
    s.add_argument("--slides", type=int, default=1, help="number of slides (shared gene panel)")
    s.add_argument("--version", type=int, default=2, choices=(1, 2, 3),
                   help="2 (default): spatial domains + context-driven genes; 1: expression from the spot alone "
                        "(byte-identical to the original generator); 3: v2's genes over classes that share their "
                        "mean stain and differ in morphology, seen through a per-site and per-slide stain")
    s.add_argument("--sites", type=int, default=None,
                   help="v3: a multi-site set of this many sites (slide ids site<s>_slide<j>; --slides is ignored)")
    s.add_argument("--slides-per-site", type=int, default=2, help="v3 with --sites: slides per site")
    s.add_argument("--site", type=int, default=0, help="v3 without --sites: the site of every slide")
    s.add_argument("--site-report", action="store_true",
                   help="v3 with --sites: print how much colour vs true morphology explains within a slide and "
                        "across sites (stalign.lab.synth_sites.site_report)")
    s.add_argument("--n-domains", type=int, default=4, help="v2: spatial domains per slide (2-8)")
    s.add_argument("--domains", default="layers", choices=("layers", "islands"),
                   help="v2: domain geometry (bands like cortical layers, or patchy regions)")
    s.add_argument("--report", action="store_true",
                   help="v2: print how much variance each gene programme's driver explains (R² tables)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.set_defaults(func=_synth)


def _fetch(args: argparse.Namespace) -> int:
    from stalign.data.fetch import DATASETS, fetch

    if args.list or not args.name:
        for name, spec in DATASETS.items():
            print(f"{name:22s} {spec.requirement:42s} {spec.description}")
        return 0
    path = fetch(args.name, root=args.dest, force=args.force)
    print(path)
    return 0


def _export_hest(args: argparse.Namespace) -> int:
    from stalign.commands.common_args import read_gene_file
    from stalign.data.hest_bench_io import export_task

    out = export_task(args.shards, args.out, genes=read_gene_file(args.genes) if args.genes else None)
    print(f"HEST-Bench task folder -> {out} (run: stalign bench --hest-bench {out} --encoders ...)")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from stalign.lab.synth import make_synthetic_dataset, make_synthetic_sites

    if args.report and args.version < 2:
        raise InputError("--report needs synth v2 (v1 has no context programmes)")
    if (args.sites is not None or args.site_report) and args.version != 3:
        raise InputError("--sites and --site-report need --version 3 (sites differ in stain only in synth v3)")
    if args.site_report and (args.sites or 0) < 2:
        raise InputError("--site-report needs --sites 2 or more (it trains on some sites and tests on another)")
    common = dict(n_spots=args.n_spots, um_per_px=args.um_per_px, n_genes=args.n_genes, n_classes=args.n_classes,
                  progress=not args.quiet, n_domains=args.n_domains, domain_layout=args.domains)
    if args.sites is not None:
        slides = make_synthetic_sites(args.out, n_sites=args.sites, slides_per_site=args.slides_per_site,
                                      seed=args.seed, **common)
    else:
        slides = make_synthetic_dataset(args.out, n_slides=args.slides, seed=args.seed, version=args.version,
                                        **common, **({"site": args.site} if args.version == 3 else {}))
    for s in slides:
        t = s.truth
        h, w = t["level_shapes_hw"][0]
        print(f"{s.slide_id}: {w}x{h} px at {t['um_per_px']} um/px, {len(t['level_shapes_hw'])} levels, "
              f"{t['n_spots']} spots ({t['n_in_tissue']} on tissue), {len(t['genes'])} genes, "
              f"{s.seconds:.1f} s")
        if "context" in t:
            counts = ", ".join(f"{k} {v}" for k, v in t["context"]["domain_spot_counts"].items())
            drivers = [g.get("driver") for g in t["genes"]]
            if "site" in t:
                st = t["stain"]["slide"]
                print(f"  v3 {t['site']}: stain scale H {st['h_scale']:.2f} E {st['e_scale']:.2f}, white "
                      f"{[round(w) for w in st['white']]}, blur {st['blur_px']:.2f} px, JPEG q{st['jpeg_quality']}")
            print(f"  v{t['version']} ({t['context']['domain_layout']}): {counts} spots; genes: {drivers.count('spot')} "
                  f"spot-driven, {drivers.count('context')} context-driven, {drivers.count('none')} housekeeping")
        for kind, path in s.paths.items():
            print(f"  {kind:6s} {path}  ({path.stat().st_size / 1e6:.1f} MB)")
        if args.report:
            from stalign.lab.synth_truth import report

            print(report(s.paths["adata"]))
    if args.site_report:
        from stalign.lab.synth_sites import site_report

        print(site_report(slides))
    return 0
