"""The tutorials execute top to bottom on the real Visium crop in their quick mode (``STALIGN_QUICK=1``: tiny
training, small crops), with no ``make demo`` run to lean on, so they train their models themselves."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("nbclient")
pytest.importorskip("scanpy")


def _run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, crop: Path) -> tuple[list, str]:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("STALIGN_QUICK", "1")
    monkeypatch.setenv("STALIGN_DATA", str(crop))
    monkeypatch.setenv("STALIGN_WORK", str(tmp_path))
    monkeypatch.setenv("STALIGN_DEMO_RUN", str(tmp_path / "no_demo_run"))
    monkeypatch.delenv("STALIGN_CHECKPOINT", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 8, "a tutorial explains its steps"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "quick run" in text and "49 spots" in text and "cannot show" in text
    maps = list((tmp_path / "maps").rglob("*.png"))
    assert maps and all(p.stat().st_size > 2000 for p in maps)
    return maps, text


def test_zero_shot_tutorial(tmp_path, monkeypatch, squidpy_crop):
    import anndata as ad
    import numpy as np

    maps, text = _run("zero_shot_retrieval", tmp_path, monkeypatch, squidpy_crop)
    steps = [int(s) for s in re.findall(r"fold \d: model trained for (\d+) steps", text)]
    assert len(steps) == 5 and min(steps) > 0  # a trained model per fold, not an untrained one
    assert "neighbour average" in text and "signature" in text
    assert {"pearson_per_gene.png", "predicted_vs_measured.png", "signature_map.png"} <= {p.name for p in maps}
    pred = ad.read_h5ad(tmp_path / "zero_shot_heldout.h5ad")  # held-out predictions of every spot, scanpy-ready
    assert pred.n_obs == 49 and set(pred.obs["fold"]) == {str(f) for f in range(5)}
    assert np.isfinite(pred.X).all() and "measured" in pred.layers and pred.uns["spatial"]


def test_fewshot_tutorial(tmp_path, monkeypatch, squidpy_crop):
    from stalign.tasks.fewshot_io import load_head

    maps, text = _run("fewshot_finetune", tmp_path, monkeypatch, squidpy_crop)
    assert int(re.search(r"base model: .*; trained for (\d+) steps", text).group(1)) > 0
    changed = re.search(r"changed (\d+) encoder weight tensors .*e\.g\. \['(\w+)", text)
    assert int(changed.group(1)) > 0 and changed.group(2).endswith("image_encoder")  # a real fine-tune of the encoder
    assert "after: MLP head + last 2 blocks fine-tuned" in text and "6 nearest labelled spots (no image)" in text
    assert {"labels.png", "before_after.png"} <= {p.name for p in maps}
    head = load_head(tmp_path / "fewshot")
    assert head.kind == "head" and (tmp_path / "fewshot" / "model" / "model.safetensors").is_file()
