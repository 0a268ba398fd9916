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

REPO = Path(__file__).resolve().parents[1]
NEIGHBOURS = "neighbour average (6 nearest training spots, no image)"
BASELINES = ("mean of the training spots", "colour statistics (spot) + ridge",
             "colour statistics (spot + niche) + ridge", "ImageNet features (spot) + ridge",
             "ImageNet features (spot + niche) + ridge")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    results = out / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--quick", "--out",
                           str(out / "run"), "--results", str(results)], capture_output=True, text=True, cwd=out,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout, pd.read_csv(out / "run" / "ablation_rows.csv"), results.read_text()


def test_every_arm_and_baseline_has_a_row(quick_run):
    from stalign.lab.ablation import arms

    _, _, rows, _ = quick_run
    for split, chosen in (("site", arms()), ("block", ("spot", "niche"))):  # --quick: two arms on blocks
        r = rows[rows["split"] == split]
        assert sorted(r.loc[r["arm"] != "baseline", "arm"]) == sorted(chosen), split
        assert set(BASELINES) <= set(r.loc[r["arm"] == "baseline", "method"]), split
        assert (NEIGHBOURS in set(r["method"])) == (split == "block")  # no training spots on an unseen site
    base = rows[rows["method"] == BASELINES[0]]
    assert base["r_spot"].isna().all() and (base["mse_spot"] > 0).all()  # a constant has an MSE, not an r
    models = rows[rows["arm"] != "baseline"]
    for col in ("recall@1", "recall@10", "r_spot", "r_context", "mse_spot", "mse_context", "ridge_r_context",
                "domain_ari", "domain_nmi", "loss_first", "loss_last"):
        assert models[col].notna().all(), col
    assert ((models["recall@10"] >= 0) & (models["recall@10"] <= 1)).all()
    for _, g in models.groupby("split"):
        assert (g["chance@10"] == g["chance@10"].iloc[0]).all()  # one held-out set for every arm of a split
    assert (models["mse_spot"] > 0).all() and (rows["mse_context"] > 0).all()


def test_table_is_recorded_with_every_method(quick_run):
    _, stdout, rows, results = quick_run
    assert "Ablation: niche, fusion and the gene side" in results and "machine:" in results
    site, block = results.split("**Within-slide held-out blocks")
    assert "**Held-out site" in site
    for text, split in ((site, "site"), (block, "block")):
        table = [line for line in text.splitlines() if line.startswith("| ")]
        assert len(table) == 1 + rows.loc[rows["split"] == split, "method"].nunique()  # header + one per method
        assert all(line.count("|") == table[0].count("|") for line in table)
        assert "chance: recall@1" in text
    assert "seed 0, site split" in stdout and "every slide of site0" in stdout


def test_the_site_split_trains_on_the_other_sites_only(quick_run):
    """Seed 0 holds out site0: its runs train on the slides of site1 and site2 only; the block split's runs see
    every slide."""
    import yaml

    out, _, _, _ = quick_run
    site_cfg = yaml.safe_load((out / "run" / "seed0" / "site" / "spot" / "config.yaml").read_text())
    assert site_cfg["slides"] == ["site1_slide0", "site2_slide0"]
    block_cfg = yaml.safe_load((out / "run" / "seed0" / "block" / "spot" / "config.yaml").read_text())
    assert block_cfg["slides"] is None and block_cfg["split_by"] == "block"


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


def test_unknown_arm_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--quick", "--no-record",
                           "--out", str(tmp_path), "--arms", "spot", "nonsense"], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown ablation arm(s) nonsense")
    assert "Traceback" not in proc.stderr


def test_summary_is_mean_and_std_over_seeds():
    from stalign.lab.ablation import summarise

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
