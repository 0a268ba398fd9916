"""`stalign fewshot --kind prototype|logistic --labels`: region-label classifiers on the real Visium crop with a
tiny model (cross-validated table, saved head, predict writing labels) and clear errors for bad label files."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest


def _predict_tests():
    """tests/test_predict.py as a module (pytest's importlib mode puts no test folder on sys.path)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_stalign_test_predict", Path(__file__).with_name("test_predict.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup = _predict_tests().setup  # the real crop's shards + a tiny checkpoint: one fixture for both files


@pytest.fixture(scope="module")
def labelled(setup):
    import anndata as ad

    adata = ad.read_h5ad(setup["h5ad"])
    x = adata.obsm["spatial"][:, 0]
    side = np.where(x < np.median(x), "left", "right").astype(object)  # a spatial split of the 49 spots
    return {**setup, "barcodes": list(adata.obs_names), "side": side,
            "um_per_px": setup["manifest"]["slides"][0]["um_per_px"]}


def _csv(path, barcodes, labels, slide_id=None):
    import pandas as pd

    table = {"barcode": barcodes, "label": labels}
    pd.DataFrame(table if slide_id is None else {"slide_id": slide_id, **table}).to_csv(path, index=False)
    return str(path)


def _fewshot(data: dict, labels: str, out, kind: str = "logistic") -> int:
    from stalign.cli import main

    return main(["fewshot", "--model", str(data["ckpt"]), "--shards", str(data["shards"]), "--out", str(out),
                 "--kind", kind, "--labels", labels, "--workers", "0", "--quiet"])


@pytest.mark.parametrize("kind", ["prototype", "logistic"])
def test_label_classifier_reports_cv_accuracy_and_saves_a_head(labelled, tmp_path, capsys, kind):
    import anndata as ad

    import stalign
    from stalign.cli import main
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.fewshot_io import load_head

    labels = labelled["side"].copy()
    labels[:5] = None  # unlabelled spots are skipped
    assert _fewshot(labelled, _csv(tmp_path / "labels.csv", labelled["barcodes"], labels), tmp_path / "head", kind) == 0
    out = capsys.readouterr().out
    assert f"{kind} on 44 labelled spots, 2 classes, 5 stratified folds" in out
    rows = {line[:28].strip(): [float(v) for v in line[28:].split()] for line in out.splitlines()[2:4]}
    assert set(rows) == {kind, "baseline (majority class)"} and "accuracy" in out and "balanced" in out
    assert all(0 <= v <= 1 for v in rows[kind] + rows["baseline (majority class)"])
    assert rows["baseline (majority class)"][1] == 0.5  # the majority class: balanced accuracy of chance
    head = load_head(tmp_path / "head")
    assert head.kind == kind and head.embedding_info["cv"]["n_spots"] == 44
    assert json.loads((tmp_path / "head" / "head.json").read_text())["classes"] == ["left", "right"]
    emb = embed_shards(stalign.load_checkpoint(labelled["ckpt"]), labelled["shards"], gene=False, progress=False)["image"]
    assert set(head.predict(emb)) <= {"left", "right"} and len(head.predict(emb)) == 49
    if kind == "prototype":
        return  # the predict round trip below runs once (logistic), to keep the file fast
    # stalign predict with a label head: expression from the reference, labels in obs['predicted_label']
    common = ["predict", "--model", str(labelled["ckpt"]), "--slide", str(labelled["image"]), "--um-per-px",
              str(labelled["um_per_px"]), "--fewshot-head", str(tmp_path / "head"), "--heatmap-genes", "none",
              "--workers", "0", "--quiet"]
    assert main([*common, "--reference", str(labelled["shards"]), "--out", str(tmp_path / "p.h5ad"), "--step-um",
                 "150"]) == 0
    pred = ad.read_h5ad(tmp_path / "p.h5ad")
    assert pred.uns["stalign"]["X"] == "zero_shot" and pred.n_obs > 10
    np.testing.assert_array_equal(pred.obs["predicted_label"].astype(str), head.predict(pred.obsm["X_stalign"]))
    assert main([*common, "--out", str(tmp_path / "q.h5ad")]) == 1  # labels only: no expression for X
    assert "predicts region labels, not expression" in capsys.readouterr().err


def test_slide_id_column_matches_spots_of_the_named_slide(labelled, tmp_path, capsys):
    sid = labelled["manifest"]["slides"][0]["slide_id"]
    labels = _csv(tmp_path / "l.csv", labelled["barcodes"], labelled["side"], slide_id=sid)
    assert _fewshot(labelled, labels, tmp_path / "head", "prototype") == 0
    assert "on 49 labelled spots" in capsys.readouterr().out
    wrong = _csv(tmp_path / "w.csv", labelled["barcodes"], labelled["side"], slide_id="other_slide")
    assert _fewshot(labelled, wrong, tmp_path / "h2") == 1
    assert "w.csv: 49 labelled barcodes are not spots of the shards" in capsys.readouterr().err


def test_bad_label_files_get_clear_errors(labelled, tmp_path, capsys):
    import pandas as pd

    from stalign.cli import main

    b, side = labelled["barcodes"], labelled["side"]
    cases = {
        "missing.csv": (None, "missing.csv: labels file does not exist"),
        "unknown.csv": ((b[:10] + ["NOT-A-BARCODE"], list(side[:10]) + ["left"]),
                        "unknown.csv: 1 labelled barcodes are not spots of the shards.*NOT-A-BARCODE"),
        "one_class.csv": ((b, ["left"] * len(b)), "one_class.csv: 49 labelled spots but only one class"),
        "too_few.csv": ((b[:10], ["left"] * 9 + ["right"]), "too_few.csv: too few labelled spots: class 'right'"),
        "twice.csv": ((b[:4] + b[:1], ["left", "left", "right", "right", "right"]), "twice.csv: spots labelled twice"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            _csv(tmp_path / name, *content)
        assert _fewshot(labelled, str(tmp_path / name), tmp_path / "h") == 1, name
        assert re.search(message, capsys.readouterr().err), name
    pd.DataFrame({"spot": b, "region": side}).to_csv(tmp_path / "cols.csv", index=False)
    assert _fewshot(labelled, str(tmp_path / "cols.csv"), tmp_path / "h") == 1
    assert "cols.csv: the CSV needs columns barcode,label" in capsys.readouterr().err
    assert main(["fewshot", "--model", str(labelled["ckpt"]), "--shards", str(labelled["shards"]), "--out",
                 str(tmp_path / "h"), "--kind", "prototype", "--quiet"]) == 1
    assert "--kind prototype needs --labels" in capsys.readouterr().err
    assert not (tmp_path / "h").exists()  # nothing written on bad input
