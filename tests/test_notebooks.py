"""The notebooks execute top to bottom on the real Visium crop (so they cannot rot)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("nbclient")
pytest.importorskip("stalign.models.factory")
pytest.importorskip("stalign.data.pipeline")


@pytest.mark.parametrize("name", ["zero_shot_retrieval", "fewshot_finetune"])
def test_notebook_executes(name, tmp_path, monkeypatch, squidpy_crop):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("STALIGN_DATA", str(squidpy_crop))
    monkeypatch.setenv("STALIGN_WORK", str(tmp_path))
    monkeypatch.delenv("STALIGN_CHECKPOINT", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "49 spots" in text
    assert list((tmp_path / "maps").glob("*.png")) and all(p.stat().st_size > 2000 for p in (tmp_path / "maps").glob("*.png"))
