"""The demo's ablation stage: a short version (one seed, few steps) of ``benchmarks/ablation.py`` on small
synthetic slides with spot-driven and context-driven genes; the full table (3 seeds, every arm) is in
benchmarks/RESULTS.md and docs/model.md."""
from __future__ import annotations

from stalign.lab.demo_stages import DemoContext, stage

ABLATION_TABLE = "ablation (short): what niche images and three-target fusion add"
DEMO_ARMS = ("spot", "niche", "project")  # the published model: full table only (its 100 steps took ~10x an arm here)


@stage("ablation")
def ablation_stage(ctx: DemoContext) -> None:
    """One seed of the spot-only, + niche and three-target (project) arms, plus the baselines."""
    import pandas as pd

    from stalign.lab.ablation import AblationSettings, run_ablation

    a = ctx.args
    s = AblationSettings(out=ctx.out / "ablation", seeds=[0], arms=list(DEMO_ARMS), version=2, splits=["block"],
                         slides=2,
                         spots=a.ablation_spots, um_per_px=1.0, genes=60, patch_px=64, steps=a.ablation_steps,
                         batch_size=a.batch_size or 32, imagenet=True, threads=a.threads or 1, progress=not a.quiet,
                         feature_views=0, eval_every=0, patience=0)  # a short run from pixels, as README measured
    rows = run_ablation(s)  # also writes OUT/ablation_rows.csv
    out = ctx.rows.setdefault(ABLATION_TABLE, [])
    for r in rows:
        if r["arm"] == "baseline" and not r["method"].startswith(("neighbour", "ImageNet features (spot + niche)")):
            continue
        out.append({"method": r["method"],
                    "R@10": "-" if pd.isna(r.get("recall@10")) else f"{r['recall@10']:.3f}",
                    "r spot genes": f"{r['r_spot']:.3f}", "r context genes": f"{r['r_context']:.3f}",
                    "domain ARI": "-" if pd.isna(r.get("domain_ari")) else f"{r['domain_ari']:.3f}"})
    chance = next((r["chance@10"] for r in rows if "chance@10" in r and not pd.isna(r["chance@10"])), None)
    ctx.notes[ABLATION_TABLE] = [
        (f"1 seed, {s.steps} steps, {s.slides} synthetic slides x {s.spots} spots (held-out blocks with a niche-wide "
         f"margin); r = held-out Pearson per gene of zero-shot retrieval (arms) or ridge / neighbour average "
         f"(baselines); chance R@10 = {chance:.3f}" if chance is not None else "1 seed"),
        "one seed and few steps are noisy: the full ablation (3 seeds, every arm, mean ± std) is in "
        "benchmarks/RESULTS.md (python benchmarks/ablation.py); rows: " + str(s.out / "ablation_rows.csv")]
