"""``make demo`` (``python -m stalign.demo``): the data stages on the real crop and a small synthetic slide."""
from __future__ import annotations

import json

import h5py
import pytest

from stalign import demo


def test_demo_data_stages_print_the_result_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--stages", "fetch,prep", "--synth-spots", "60", "--synth-um-per-px", "2",
                      "--n-top-genes", "20", "--quiet"]) == 0
    text = capsys.readouterr().out
    for header in ("=== stage fetch", "=== stage prep", "[prep]", "squidpy_visium_crop", "synth0",
                   "the spot pitch would give 0.72"):
        assert header in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == {"fetch", "prep"}
    rows = {r["data"]: r for r in summary["tables"]["prep"]}
    real, synth = rows["squidpy"], rows["synthetic"]
    assert real["spots"] == 49 and real["kept"] + real["dropped"] == 49 and real["genes"] == 20
    assert real["um_per_px"] == pytest.approx(55 / 89.44, rel=1e-3) and "spot diameter" in real["pixel size from"]
    assert synth["spots"] == 60 and synth["dropped"] > 0 and synth["um_per_px"] == 2.0
    assert "resolution" in synth["pixel size from"].lower() or "mpp" in synth["pixel size from"].lower()
    with h5py.File(out / "shards" / "squidpy" / "shards" / "squidpy_visium_crop.h5") as f:
        assert f["spot_patches"].shape == (real["kept"], 224, 224, 3) and f["expr"].shape == (real["kept"], 20)


def test_demo_rejects_unknown_stage(tmp_path):
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path), "--stages", "fetch,nonsense"])
