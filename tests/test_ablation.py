"""``benchmarks/ablation.py --quick``: every arm and baseline runs on synth v3 slides of three sites (spot- and
context-driven genes, per-site stain) in both splits (an unseen site; within-slide blocks) and lands in the
tables; bad requests are one-line errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
NEIGHBOURS = "neighbour average (6 nearest training spots, no image)"
BASELINES = ("mean of the training spots", "colour statistics (spot) + ridge",
             "colour statistics (spot + niche) + ridge", "ImageNet features (spot) + ridge",
             "ImageNet features (spot + niche) + ridge")


def _quick(out: Path, *args: str, results: Path | None = None) -> subprocess.CompletedProcess:
    record = ["--results", str(results)] if results else ["--no-record"]
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--quick", "--out", str(out),
                           *record, *args], capture_output=True, text=True, cwd=out.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick`` makes the v3 slides of three sites and runs spot only and + niche on both splits."""
    out = tmp_path_factory.mktemp("ablation")
    results = out / "RESULTS.md"
    proc = _quick(out / "run", "--arms", "spot", "niche", results=results)
    return out, proc.stdout, pd.read_csv(out / "run" / "ablation_rows.csv"), results.read_text()


def _site_run(quick_run, name: str, *arms: str) -> tuple[Path, pd.DataFrame]:
    """More arms on the cross-site split of the quick run's v3 slides (``--shards`` / ``--synth-dir``)."""
    run, out = quick_run[0] / "run", quick_run[0] / name
    _quick(out, "--shards", str(next(run.glob("shards_v3_*"))), "--synth-dir", str(next(run.glob("slides_v3_*"))),
           "--arms", *arms, "--splits", "site")
    return out, pd.read_csv(out / "ablation_rows.csv")


@pytest.fixture(scope="module")
def stain_run(quick_run):
    """The stain and fine-tuning arms."""
    return _site_run(quick_run, "stain", "stain_aug", "stain_norm", "finetune")


@pytest.fixture(scope="module")
def fusion_run(quick_run):
    """Three targets (project variant and ST-Align as published) and the niche gene encoders."""
    return _site_run(quick_run, "fusion", "project", "paper", "niche_mean", "niche_se2")


@pytest.fixture(scope="module")
def stofm_run(quick_run):
    """The SToFM gene sides: pretrained and frozen (the project's and the original architecture), from scratch."""
    return _site_run(quick_run, "stofm", "stofm_frozen", "stofm_original", "stofm_scratch")


def _check_model_rows(models: pd.DataFrame) -> None:
    for col in ("recall@1", "recall@10", "r_spot", "r_context", "mse_spot", "mse_context", "ridge_r_context",
                "domain_ari", "domain_nmi", "loss_first", "loss_last", "steps", "best_step", "seconds",
                "train_seconds"):
        assert models[col].notna().all(), col
    assert ((models["recall@10"] >= 0) & (models["recall@10"] <= 1)).all()
    assert ((models["best_step"] >= 1) & (models["best_step"] <= models["steps"]) & (models["steps"] <= 6)).all()
    for _, g in models.groupby("split"):
        assert (g["chance@10"] == g["chance@10"].iloc[0]).all()  # one held-out set for every arm of a split
    assert (models["mse_spot"] > 0).all()


def test_both_splits_have_their_arms_and_baselines(quick_run):
    _, _, rows, _ = quick_run
    for split in ("site", "block"):
        r = rows[rows["split"] == split]
        assert sorted(r.loc[r["arm"] != "baseline", "arm"]) == ["niche", "spot"], split
        assert set(BASELINES) <= set(r.loc[r["arm"] == "baseline", "method"]), split
        assert (NEIGHBOURS in set(r["method"])) == (split == "block")  # no training spots on an unseen site
    base = rows[rows["method"] == BASELINES[0]]
    assert base["r_spot"].isna().all() and (base["mse_spot"] > 0).all()  # a constant has an MSE, not an r
    assert (rows["mse_context"] > 0).all()
    _check_model_rows(rows[rows["arm"] != "baseline"])


def test_block_split_trains_the_site_splits_best_steps(quick_run):
    """Nothing is selected on the held-out blocks (they are the run's validation): each block run trains exactly
    the steps at which the same arm and seed was best on the site split, without the plateau stop."""
    out, _, rows, _ = quick_run
    models = rows[rows["arm"] != "baseline"].set_index(["arm", "split"])
    for arm in ("spot", "niche"):
        assert models.loc[(arm, "block"), "steps"] == models.loc[(arm, "site"), "best_step"]
    cfg = yaml.safe_load((out / "run" / "seed0" / "block" / "spot" / "config.yaml").read_text())
    assert cfg["early_stop_patience"] == 0 and cfg["max_steps"] == models.loc[("spot", "site"), "best_step"]
    site = yaml.safe_load((out / "run" / "seed0" / "site" / "spot" / "config.yaml").read_text())
    assert site["early_stop_patience"] == 1 and site["eval_every"] == 2 and site["feature_views"] == 2


def test_learning_curves_are_written(quick_run):
    out, _, rows, _ = quick_run
    curves = pd.read_csv(out / "run" / "curves.csv")
    assert list(curves.columns) == ["arm", "seed", "split", "step", "train_loss", "val_loss"]
    assert set(zip(curves["arm"], curves["split"])) == {("spot", "site"), ("niche", "site"), ("spot", "block"),
                                                        ("niche", "block")}
    assert not curves.duplicated(["arm", "split", "step"]).any()
    assert curves["val_loss"].notna().all() and (curves["step"] % 2 == 0).all()
    site = rows[(rows["split"] == "site") & (rows["arm"] == "spot")].iloc[0]
    assert curves.loc[(curves["arm"] == "spot") & (curves["split"] == "site"), "step"].max() == site["steps"]
    assert (out / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_stain_arms_and_the_normalised_baseline(stain_run):
    """stain_norm trains and is scored on shards of the same slides Macenko-normalised to a training-site slide
    (seed 0 holds out site0: the target is site1_slide0); colour statistics + ridge gets a row on those shards;
    stain_aug adds HED jitter; finetune trains its last image-encoder blocks from pixels, the rest read stored
    views."""
    from stalign.data.shards import read_manifest
    from stalign.lab.ablation import STAIN_JITTER

    out, rows = stain_run
    cfg = {a: yaml.safe_load((out / "seed0" / "site" / a / "config.yaml").read_text())
           for a in ("stain_aug", "stain_norm", "finetune")}
    norm = Path(cfg["stain_norm"]["data"])
    assert norm.name.endswith("_macenko_site1_slide0") and norm.parent == out
    manifest = read_manifest(norm)
    assert manifest["stain_norm"] == "macenko" and manifest["stain_target"] == "site1_slide0"
    assert len(manifest["stain_matrix"]) == 3
    assert read_manifest(Path(cfg["stain_aug"]["data"])).get("stain_norm", "none") == "none"
    assert cfg["stain_aug"]["stain_jitter"] == STAIN_JITTER and cfg["stain_norm"]["stain_jitter"] == 0
    assert cfg["finetune"]["feature_views"] == 0 and cfg["stain_aug"]["feature_views"] == 2
    spot = cfg["finetune"]["model_overrides"]["spot_image"]
    assert spot["unfreeze_last"] == 1 and not spot["freeze"]
    assert cfg["stain_aug"]["model_overrides"]["spot_image"]["freeze"]
    methods = set(rows["method"])
    for name in BASELINES[1:3]:
        assert f"{name}, Macenko-normalised crops" in methods
    normed = rows[rows["method"].str.endswith("Macenko-normalised crops")]
    assert normed["r_spot"].notna().all() and (normed["mse_spot"] > 0).all()


def test_gene_side_arms(stofm_run):
    """stofm_original's gene side is the original SToFM architecture pretrained (its objective) on the training
    slides only, then frozen; its pretraining time is on its row."""
    import json

    out, rows = stofm_run
    stofm = {k: out / "seed0" / "site" / f"pretrain_{k}" for k in ("tiny", "original")}
    config = json.loads((stofm["original"] / "run" / "model" / "config.json").read_text())
    assert config["se2"]["arch"] == "original"
    assert "arch" not in json.loads((stofm["tiny"] / "run" / "model" / "config.json").read_text())["se2"]
    assert sorted(p.stem for p in stofm["original"].glob("*.h5ad")) == ["site1_slide0", "site2_slide0"]
    cfg = yaml.safe_load((out / "seed0" / "site" / "stofm_original" / "config.yaml").read_text())
    kwargs = cfg["model_overrides"]["gene"]["encoder_kwargs"]
    assert kwargs["freeze"] and Path(kwargs["model"]) == stofm["original"] / "run" / "model"
    models = rows[rows["arm"] != "baseline"].set_index("arm")
    assert models.loc[["stofm_original", "stofm_frozen"], "pretrain_seconds"].gt(0).all()
    assert pd.isna(models.loc["stofm_scratch", "pretrain_seconds"])


def test_every_arm_has_a_row(quick_run, stain_run, fusion_run, stofm_run):
    """``--quick`` without --arms runs every arm; here they are run in four groups (each test stays short)."""
    from stalign.lab.ablation import arms

    every = pd.concat([quick_run[2], stain_run[1], fusion_run[1], stofm_run[1]])
    models = every[every["arm"] != "baseline"]
    assert sorted(set(models["arm"])) == sorted(arms())
    _check_model_rows(models)
    paper = fusion_run[1].set_index("arm").loc["paper"]
    assert paper["steps"] >= paper["best_step"] and pd.isna(paper["pretrain_seconds"])


def test_table_is_recorded_with_every_method(quick_run):
    _, stdout, rows, results = quick_run
    assert "Ablation: niche, fusion and the gene side" in results and "machine:" in results
    site, block = results.split("**Within-slide held-out blocks")
    assert "**Held-out site" in site
    for text, split in ((site, "site"), (block, "block")):
        table = [line for line in text.splitlines() if line.startswith("| ")]
        assert len(table) == 1 + rows.loc[rows["split"] == split, "method"].nunique()  # header + one per method
        assert all(line.count("|") == table[0].count("|") for line in table)
        assert "chance: recall@1" in text and "| steps | best_step | seconds |" in text
    assert "seed 0, site split" in stdout and "every slide of site0" in stdout


def test_the_site_split_trains_on_the_other_sites_only(quick_run):
    """Seed 0 holds out site0: its runs train on the slides of site1 and site2 only; the block split's runs see
    every slide."""
    out, _, _, _ = quick_run
    site_cfg = yaml.safe_load((out / "run" / "seed0" / "site" / "spot" / "config.yaml").read_text())
    assert site_cfg["slides"] == ["site1_slide0", "site2_slide0"]
    block_cfg = yaml.safe_load((out / "run" / "seed0" / "block" / "spot" / "config.yaml").read_text())
    assert block_cfg["slides"] is None and block_cfg["split_by"] == "block"


def test_stain_target_is_a_training_site_slide():
    from stalign.lab.ablation_data import stain_target
    from stalign.lab.ablation_eval import ShardTruth, site_split

    site = np.array(["s0", "s0", "s1", "s1", "s2", "s2"], dtype=object)
    slide = np.array(["s0_b", "s0_a", "s1_b", "s1_a", "s2_a", "s2_b"], dtype=object)
    t = ShardTruth(genes=[], gene_sets={}, domains=site, coords_um=np.zeros((6, 2)), slide=slide, site=site)
    targets = []
    for seed in range(3):
        train, _, held = site_split(t, seed)
        targets.append(stain_target(t, train))
        assert not targets[-1].startswith(held)
    assert targets == ["s1_a", "s0_a", "s0_a"]


def test_run_keys_of_each_split_and_arm():
    from stalign.lab.ablation import AblationSettings, _image, arms, run_keys

    s = AblationSettings(feature_views=4, patience=5, min_delta=0.01, finetune_blocks=2)
    a = arms()
    assert run_keys(s, a["project"]) == {"feature_views": 4, "early_stop_patience": 5, "early_stop_min_delta": 0.01}
    assert run_keys(s, a["finetune"]) == {"early_stop_patience": 5, "early_stop_min_delta": 0.01}  # from pixels
    assert run_keys(s, a["niche"], steps=250) == {"feature_views": 4, "max_steps": 250, "warmup_steps": 25}
    assert _image(s, a["finetune"])["unfreeze_last"] == 2 and not _image(s, a["finetune"])["freeze"]
    assert _image(s, a["stain_aug"])["freeze"] and _image(s, a["stain_aug"])["unfreeze_last"] == 0
    assert a["stain_aug"].train == {"stain_jitter": 0.05} and a["stain_norm"].stain_norm


def test_curve_rows_average_the_training_loss_between_evaluations(tmp_path):
    from types import SimpleNamespace

    from stalign.lab.ablation_curves import curve_rows, write_curves

    result = SimpleNamespace(losses=[(1, 4.0), (2, 2.0), (3, 3.0), (4, 1.0)],
                             val_history=[{"step": 2, "val_loss": 2.5}, {"step": 4, "val_loss": 2.0},
                                          {"step": 4, "val_loss": 1.9}])  # the kept weights scored again
    rows = curve_rows(result, arm="spot", seed=1, split="site")
    assert [(r["step"], r["train_loss"], r["val_loss"]) for r in rows] == [(2, 3.0, 2.5), (4, 2.0, 2.0)]
    assert curve_rows(SimpleNamespace(losses=[(1, 1.0)]), arm="a", seed=0, split="site") == []
    csv, png = write_curves(rows + curve_rows(result, arm="niche", seed=2, split="block"), tmp_path)
    assert len(pd.read_csv(csv)) == 4 and png is not None and png.stat().st_size > 1000
    assert write_curves([], tmp_path / "none")[1] is None


def test_site_split_holds_out_one_site_per_seed():
    from stalign.lab.ablation_eval import ShardTruth, site_split

    site = np.array(["b", "a", "c", "a", "b"], dtype=object)
    t = ShardTruth(genes=[], gene_sets={}, domains=site, coords_um=np.zeros((5, 2)), slide=site, site=site)
    assert [site_split(t, seed)[2] for seed in range(4)] == ["a", "b", "c", "a"]
    train, test, _ = site_split(t, 1)
    assert list(test) == [0, 4] and list(train) == [1, 2, 3]
    with pytest.raises(ValueError, match="two or more sites"):
        site_split(ShardTruth(genes=[], gene_sets={}, domains=site[:1], coords_um=np.zeros((1, 2)),
                              slide=site[:1], site=site[:1]), 0)


def test_a_site_split_on_v2_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--no-record", "--out",
                           str(tmp_path), "--version", "2", "--splits", "site", "--seeds", "0"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the cross-site split needs synth v3 slides")
    assert not any(tmp_path.iterdir())  # nothing made


def test_a_plateau_stop_without_evaluations_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--no-record", "--out",
                           str(tmp_path), "--patience", "3", "--eval-every", "0"], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: a plateau stop (patience 3) needs held-out")
    assert not any(tmp_path.iterdir())  # nothing made


def test_unknown_arm_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--quick", "--no-record",
                           "--out", str(tmp_path), "--arms", "spot", "nonsense"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown ablation arm(s) nonsense")
    assert "Traceback" not in proc.stderr


def test_summary_is_mean_and_std_over_seeds():
    from stalign.lab.ablation_tables import summarise

    rows = [{"method": "a", "seed": s, "recall@1": v, "chance@1": 0.1, "chance@10": 0.5} for s, v in
            enumerate([0.2, 0.4, 0.6])]
    text = summarise(rows)
    assert f"| a | 3 | {np.mean([0.2, 0.4, 0.6]):.3f} ± {np.std([0.2, 0.4, 0.6]):.3f} |" in text


def test_shards_without_context_truth_are_a_one_line_error(tmp_path):
    """Slides made by synth v1 have no domains or context genes: the ablation refuses them before training."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import make_synthetic_slide

    slide = make_synthetic_slide(tmp_path / "v1", n_spots=40, um_per_px=2.0, version=1, progress=False)
    prepare([read_anndata_image(slide.paths["adata"], slide.paths["image"], slide_id=slide.slide_id)],
            tmp_path / "shards", n_top_genes=20, crop=CropSpec(patch_px=32), progress=False)
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--quick", "--no-record",
                           "--out", str(tmp_path / "out"), "--shards", str(tmp_path / "shards")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: context-gene and domain measures need synth v2 ground truth") and "v1" in last
    assert not (tmp_path / "out" / "seed0").exists()  # nothing trained


def test_rows_of_separate_runs_are_summarised_together(quick_run, tmp_path):
    """Seeds run as separate processes: --from-rows joins their rows into one table; a row given twice is refused."""
    out, _, rows, _ = quick_run
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    rows.to_csv(a, index=False)
    rows.assign(seed=1).to_csv(b, index=False)
    script = [sys.executable, str(REPO / "benchmarks" / "ablation.py")]
    proc = subprocess.run([*script, "--from-rows", str(a), str(b), "--results", str(tmp_path / "R.md")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = (tmp_path / "R.md").read_text()
    assert "seeds [0, 1]" in text and f"| {rows['method'].iloc[0]} | 2 |" in text
    proc = subprocess.run([*script, "--from-rows", str(a), str(a), "--no-record"], capture_output=True, text=True)
    assert proc.returncode != 0 and "appear twice" in proc.stderr.strip().splitlines()[-1]


def test_best_steps_of_an_earlier_site_run_feed_the_block_split(tmp_path):
    """A block-split run after separate site-split runs trains each (seed, arm) its best step there; a file that
    is not such a rows table is one line naming it."""
    import pandas as pd

    from stalign.lab.ablation import AblationError
    from stalign.lab.ablation_rows import site_best_steps

    rows = tmp_path / "ablation_rows.csv"
    pd.DataFrame([{"method": "m", "arm": "niche", "split": "site", "seed": 1, "best_step": 950},
                  {"method": "m", "arm": "niche", "split": "block", "seed": 1, "best_step": 10},
                  {"method": "b", "arm": "baseline", "split": "site", "seed": 1, "best_step": None}]).to_csv(
        rows, index=False)
    assert site_best_steps([rows]) == {(1, "niche"): 950}
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(AblationError, match="other.csv"):
        site_best_steps([bad])
    older = tmp_path / "before_best_steps.csv"  # rows of a run that recorded no best step
    older.write_text("method,arm,split,seed,r_context\nm,niche,site,0,0.4\n")
    with pytest.raises(AblationError, match="no site-split row with a best step"):
        site_best_steps([older])
