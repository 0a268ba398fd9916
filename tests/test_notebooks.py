"""The tutorials execute top to bottom in their quick mode (``STALIGN_QUICK=1``: tiny training, small crops), with
no ``make demo`` run to lean on (they train their models themselves), on two slides: the real Visium crop (the
default input) and a synthetic slide written under other file names (``my_slide.h5ad`` + ``scan.tif``, raw counts,
no ``leiden`` column, none of the default signature genes) and named by ``STALIGN_INPUT`` as ``stalign prep`` reads
it, so a notebook that hard-codes the demo's files, sizes or genes fails here. Every figure must be in the executed
notebook (an image/png output), and no markdown sentence may carry a number (numbers are printed by the code)."""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("zero_shot_retrieval", "fewshot_finetune")

pytest.importorskip("nbclient")
pytest.importorskip("scanpy")


@pytest.fixture(scope="module")
def other_slide(tmp_path_factory) -> str:
    """A synthetic slide under other file names, as the one-line slide input of the notebooks."""
    from stalign.lab.synth import make_synthetic_slide

    folder = tmp_path_factory.mktemp("other_slide")
    slide = make_synthetic_slide(folder / "gen", n_spots=100, seed=3, slide_id="s3", progress=False)
    shutil.move(slide.paths["adata"], folder / "my_slide.h5ad")
    shutil.move(slide.paths["image"], folder / "scan.tif")
    shutil.rmtree(folder / "gen")
    return f"h5ad={folder / 'my_slide.h5ad'} image={folder / 'scan.tif'}"


def prose_numbers(markdown: str) -> list[str]:
    """Numbers in a markdown cell's sentences (not in `code`, not a heading's or list item's number)."""
    found = []
    for line in markdown.splitlines():
        line = re.sub(r"`[^`]*`", "", line)
        line = re.sub(r"^\s*(#+\s*)?\d+\.\s", "", line)
        found += re.findall(r"\b\d+(?:\.\d+)?\b", line)
    return found


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_markdown_states_no_numbers_of_a_run(name):
    import nbformat

    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 8, "a tutorial explains its steps"
    numbers = {i: prose_numbers(c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"}
    assert not {i: n for i, n in numbers.items() if n}, "print numbers from the code instead"
    assert prose_numbers("We use 49 spots, r = 0.3\n## 3. Folds\n1. first\n`N_GENES = 50`") == ["49", "0.3"]


def _run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slide_input: str | None):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("STALIGN_QUICK", "1")
    if slide_input:
        monkeypatch.setenv("STALIGN_INPUT", slide_input)
    else:
        monkeypatch.delenv("STALIGN_INPUT", raising=False)
    for var in ("STALIGN_DATA", "STALIGN_SIGNATURE", "STALIGN_LABELS", "STALIGN_CHECKPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("STALIGN_WORK", str(tmp_path))
    monkeypatch.setenv("STALIGN_DEMO_RUN", str(tmp_path / "no_demo_run"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "Agg")  # as on a headless machine: the figures must still reach the notebook
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    print(f"{name} on {slide_input or 'the demo crop'}: executed in {time.perf_counter() - start:.0f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
    assert "quick run" in text and "cannot show" in text
    # every cell that draws a figure shows it: an image/png output in that cell
    drawing = [c for c in code if re.search(r"savefig|display\(Image", c.source)]
    assert drawing and all(any("image/png" in o.get("data", {}) for o in c.get("outputs", [])) for c in drawing)
    maps = list((tmp_path / "maps").rglob("*.png"))
    assert maps and all(p.stat().st_size > 2000 for p in maps)
    from stalign.data.shards import read_manifest

    n_spots = read_manifest(tmp_path / "shards")["slides"][0]["n_spots"]
    assert re.search(rf"Honest note: {n_spots} spots \(", text)  # the closing note counts this run's spots
    return maps, text, n_spots


DATASETS = [pytest.param(None, id="demo_crop"), pytest.param("other", id="other_slide")]


@pytest.mark.parametrize("dataset", DATASETS)
def test_zero_shot_tutorial(tmp_path, monkeypatch, request, dataset):
    import anndata as ad
    import numpy as np

    slide_input = request.getfixturevalue("other_slide") if dataset else None
    maps, text, n_spots = _run("zero_shot_retrieval", tmp_path, monkeypatch, slide_input)
    steps = [int(s) for s in re.findall(r"fold \d: model trained for (\d+) steps", text)]
    assert len(steps) == 5 and min(steps) > 0  # a trained model per fold, not an untrained one
    assert "neighbour average" in text and "signature" in text
    assert {"pearson_per_gene.png", "predicted_vs_measured.png", "signature_map.png"} <= {p.name for p in maps}
    pred = ad.read_h5ad(tmp_path / "zero_shot_heldout.h5ad")  # held-out predictions of every spot, scanpy-ready
    assert pred.n_obs == n_spots and set(pred.obs["fold"]) == {str(f) for f in range(5)}
    assert np.isfinite(pred.X).all() and "measured" in pred.layers and pred.uns["spatial"]
    if dataset:  # no myelin genes on the synthetic slide: the panel's most variable genes stand in, said so
        assert re.search(r"none of \['Mog', .*\] is in this panel: using its 5 most variable genes", text)
        assert "log1p(counts per 10,000)" in text  # raw counts: prep normalised them, and the notebook says so


@pytest.mark.parametrize("dataset", DATASETS)
def test_fewshot_tutorial(tmp_path, monkeypatch, request, dataset):
    from stalign.tasks.fewshot_io import load_head

    slide_input = request.getfixturevalue("other_slide") if dataset else None
    maps, text, _ = _run("fewshot_finetune", tmp_path, monkeypatch, slide_input)
    assert int(re.search(r"base model: .*; trained for (\d+) steps", text).group(1)) > 0
    changed = re.search(r"changed (\d+) encoder weight tensors .*e\.g\. \['(\w+)", text)
    assert int(changed.group(1)) > 0 and changed.group(2).endswith("image_encoder")  # a real fine-tune of the encoder
    assert "after: MLP head + last 2 blocks fine-tuned" in text and "6 nearest labelled spots (no image)" in text
    assert {"labels.png", "before_after.png"} <= {p.name for p in maps}
    assert list((tmp_path / "maps" / "fewshot_grid").glob("*.png"))  # the grid heat map of the whole slide
    head = load_head(tmp_path / "fewshot")
    assert head.kind == "head" and (tmp_path / "fewshot" / "model" / "model.safetensors").is_file()
    if dataset:
        assert "no obs['leiden'] in the input: Leiden clusters of the measured expression computed here" in text
