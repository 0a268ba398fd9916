"""What niche images, three-target fusion and the SToFM gene side add: the ablation of
``stalign.lab.ablation`` on synthetic slides with spot-driven and context-driven genes (synth v3: 3 sites x 2
slides that differ in stain, classes told apart by morphology; or synth v2 with --version 2).

    python benchmarks/ablation.py                       # 3 seeds, every arm, both splits, CPU
    python benchmarks/ablation.py --arms spot niche project --seeds 0 1 2 --steps 300 --splits site
    python benchmarks/ablation.py --version 2 --slides 2 --spots 1200 --splits block   # the synth v2 table
    python benchmarks/ablation.py --quick --no-record   # seconds: checks that everything runs (the test suite)

Splits (one table each): ``site``: every slide of one site held out (site seed mod n_sites), the arms train on the
other sites' slides; ``block``: held-out squares of every slide with a niche-wide margin.

Arms: spot image only (spot loss) · + niche image (spot + niche losses) · three targets as published (stalign-paper)
· three targets, project variant · + HED stain jitter · on Macenko-normalised crops · last image-encoder blocks
fine-tuned from pixels · gene side stofm (pretrained on the training spots and frozen; the original SToFM
architecture likewise; from scratch) · niche gene encoder mean expression / SE(2). Every arm but the fine-tuned one
reads stored augmented views of frozen ImageNet EfficientNet-Lite0 features and trains until its held-out loss
plateaus (site split). Baselines on the same splits: training mean, neighbour average (block split), ImageNet
features + ridge, colour statistics + ridge (also on the normalised crops). Mean ± std over seeds; every (method,
seed) row goes to ``OUT/ablation_rows.csv``, the learning curves to ``OUT/curves.csv`` and ``OUT/curves.png``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import load_average, parser, record, setup  # noqa: E402


def main() -> None:
    from stalign.lab.ablation import AblationError, AblationSettings, arms, run_ablation
    from stalign.lab.ablation_rows import site_best_steps
    from stalign.lab.ablation_tables import summarise

    p = parser(__doc__)
    d = AblationSettings()
    p.add_argument("--out", type=Path, default=d.out, help="slides, shards and runs go here (reused when present)")
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    p.add_argument("--arms", nargs="+", default=None, help="subset of: " + " ".join(arms()))
    p.add_argument("--version", type=int, default=d.version, choices=(2, 3), help="synth world (default 3)")
    p.add_argument("--sites", type=int, default=d.sites, help="v3: sites")
    p.add_argument("--slides-per-site", type=int, default=d.slides_per_site, help="v3: slides per site")
    p.add_argument("--splits", nargs="+", default=None, choices=("site", "block"),
                   help="held-out site and/or within-slide blocks (default: both on v3, block on v2)")
    p.add_argument("--slides", type=int, default=d.slides, help="v2: slides")
    p.add_argument("--spots", type=int, default=d.spots, help="spots per slide")
    p.add_argument("--um-per-px", type=float, default=d.um_per_px)
    p.add_argument("--genes", type=int, default=d.genes, help="top-variance genes kept by prep")
    p.add_argument("--patch-px", type=int, default=d.patch_px)
    p.add_argument("--steps", type=int, default=d.steps, help="most steps per run (site split: until the plateau)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between held-out evaluations")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="site split: evaluations without a fall of --min-delta before a run stops (0: all steps)")
    p.add_argument("--min-delta", type=float, default=d.min_delta, help="smallest held-out loss fall that counts")
    p.add_argument("--feature-views", type=int, default=d.feature_views,
                   help="stored augmented views per crop (frozen image encoders; 0: every arm reads pixels)")
    p.add_argument("--block-steps", type=int, default=None,
                   help="block split: steps per run (default: the same arm and seed's best step on the site split)")
    p.add_argument("--stain-jitter", type=float, default=d.stain_jitter, help="HED stain jitter of the stain_aug arm")
    p.add_argument("--finetune-blocks", type=int, default=d.finetune_blocks,
                   help="image-encoder blocks the finetune arm trains from pixels")
    p.add_argument("--best-steps-from", type=Path, nargs="+", default=None,
                   help="ablation_rows.csv of earlier site-split runs: the block split trains each arm and seed "
                        "the steps it was best at there")
    p.add_argument("--paper-published-widths", action="store_true",
                   help="the paper arm at stalign-paper's published widths (default: the project arm's widths)")
    p.add_argument("--stofm-steps", type=int, default=d.stofm_steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-imagenet", action="store_true", help="skip the ImageNet-features baseline")
    p.add_argument("--shards", type=Path, help="run on this prep folder of synth v2 slides instead of making data")
    p.add_argument("--synth-dir", type=Path, help="where the slides of --shards are (default: where prep read them)")
    p.add_argument("--from-rows", type=Path, nargs="+", help="only summarise and record these ablation_rows.csv "
                   "(and join the curves.csv beside them into OUT/curves.csv + curves.png) "
                   "files (e.g. one per seed, run as separate processes)")
    args = p.parse_args()
    device = setup(args)
    if args.from_rows:
        return _record_rows(args, device)
    splits = args.splits or (["site", "block"] if args.version == 3 else ["block"])
    try:  # a file that is not a site run's rows: one line naming it, before anything runs
        best_steps = site_best_steps(args.best_steps_from) if args.best_steps_from else None
    except AblationError as err:
        raise SystemExit(f"error: {err}") from None
    if args.quick:
        s = AblationSettings.quick(args.out, arms=args.arms, imagenet=not args.no_imagenet, shards=args.shards,
                                   synth_dir=args.synth_dir, splits=splits)
    else:  # every option named after a setting sets it
        given = {f.name: getattr(args, f.name) for f in fields(AblationSettings) if f.name in vars(args)}
        s = AblationSettings(**{**given, "splits": splits, "site_best_steps": best_steps,
                                "imagenet": not args.no_imagenet, "threads": args.threads or 1})
    load_before, started = load_average(), time.perf_counter()
    try:
        rows = run_ablation(s)
    except AblationError as err:
        raise SystemExit(f"error: {err}") from None
    world = (f"shards {s.shards}" if s.shards is not None
             else f"synth v3, {s.sites} sites x {s.slides_per_site} slides x {s.spots} spots at {s.um_per_px} µm/px"
             if s.version == 3 else f"synth v2, {s.slides} slides x {s.spots} spots at {s.um_per_px} µm/px")
    notes = [f"{world}, splits {', '.join(s.splits)}, {s.genes} genes, "
             f"{s.patch_px}-px crops, at most {s.steps} steps per run (batch {s.batch_size}; held-out loss every "
             f"{s.eval_every} steps, patience {s.patience}, {s.feature_views} stored views), seeds {s.seeds}, "
             f"{'stalign-tiny' if s.tiny_model else 'stalign-demo with a frozen ImageNet EfficientNet-Lite0'}, "
             f"{time.perf_counter() - started:.0f} s in all; rows: {s.out / 'ablation_rows.csv'}, learning curves: "
             f"{s.out / 'curves.csv'} and curves.png"]
    record(args, title="Ablation: niche, fusion and the gene side", device=device, body=summarise(rows),
           load_before=load_before, notes=notes)


def _record_rows(args, device) -> None:
    import pandas as pd

    from stalign.lab.ablation import AblationError
    from stalign.lab.ablation_rows import read_rows
    from stalign.lab.ablation_tables import summarise

    try:  # missing, empty, binary or ragged files, rows without seeds, rows given twice: one line naming the file
        rows = pd.DataFrame(read_rows(args.from_rows))
    except AblationError as err:
        raise SystemExit(f"error: {err}") from None
    curves = [p.parent / "curves.csv" for p in args.from_rows if (p.parent / "curves.csv").is_file()]
    if curves:  # the learning curves beside the rows, joined (one line per seed) into OUT/curves.csv + .png
        from stalign.lab.ablation_curves import write_curves

        joined = pd.concat([pd.read_csv(p) for p in curves]).to_dict("records")
        print("learning curves:", ", ".join(str(p) for p in write_curves(joined, args.out) if p is not None))
    arms = rows[rows["arm"] != "baseline"]
    seconds = f", {arms['seconds'].sum():.0f} s of training + evaluation in all" if "seconds" in arms else ""
    notes = [f"rows of {', '.join(map(str, args.from_rows))}: seeds {sorted(rows['seed'].unique().tolist())}, "
             f"{arms['arm'].nunique()} arms{seconds}"]
    record(args, title="Ablation: niche, fusion and the gene side", device=device,
           body=summarise(rows.to_dict("records")), load_before=load_average(), notes=notes)


if __name__ == "__main__":
    main()
