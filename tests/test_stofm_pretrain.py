"""SToFM pretraining: exact resume from a checkpoint, CLI end to end (stofm and stalign), config errors."""
from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest

from stofm.pretrain import batch_items, load_config, pretrain

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "stofm_tiny.yaml"


def _cfg(squidpy_crop: Path, out: Path, **kw):
    return load_config(TINY, data=[str(squidpy_crop / "test_data.h5ad")], output_dir=str(out), progress=False,
                       log_every=1, **kw)


def _rows(path: Path) -> dict[int, dict[str, float]]:
    with path.open() as fh:
        return {int(r["step"]): {k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)}


def test_resume_gives_the_same_next_steps(squidpy_crop, tmp_path):
    full = pretrain(_cfg(squidpy_crop, tmp_path / "a", max_steps=4, save_every=2, grad_accum=2, batch_size=3))
    ckpt = tmp_path / "a" / "checkpoints" / "step_2"
    assert (ckpt / "trainer_state.json").is_file()
    resumed = pretrain(_cfg(squidpy_crop, tmp_path / "b", max_steps=4, save_every=2, grad_accum=2, batch_size=3),
                       resume=str(ckpt))
    assert [r["step"] for r in resumed["losses"]] == [3, 4]
    for a, b in zip(full["losses"][2:], resumed["losses"]):
        for key in ("loss", "mcm_loss", "pdr_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
    # a run that did not restore the optimizer would differ: the loss history is not constant
    assert full["losses"][2]["loss"] != pytest.approx(full["losses"][0]["loss"], rel=1e-4)


def test_pretraining_with_leiden_virtual_cells(squidpy_crop, tmp_path):
    pytest.importorskip("igraph")
    res = pretrain(_cfg(squidpy_crop, tmp_path / "l", max_steps=2, save_every=0, cluster_method="leiden"))
    assert res["step"] == 2 and len(res["losses"]) == 2
    assert all(math.isfinite(row["loss"]) for row in res["losses"])


def test_resume_latest_continues_the_log(squidpy_crop, tmp_path):
    out = tmp_path / "run"
    pretrain(_cfg(squidpy_crop, out, max_steps=2, save_every=2))
    shutil.rmtree(out / "model")
    res = pretrain(_cfg(squidpy_crop, out, max_steps=3, save_every=0), resume="latest")
    assert res["step"] == 3 and [r["step"] for r in res["losses"]] == [3]
    assert sorted(_rows(out / "train_log.csv")) == [1, 2, 3]
    assert (out / "model" / "model.safetensors").is_file()


def test_batches_cover_every_subslice_each_epoch():
    seen = [i for s in range(5) for i in batch_items(10, step=s, micro=0, grad_accum=1, batch_size=2, seed=1)]
    assert sorted(seen) == list(range(10))
    assert seen != list(range(10))  # shuffled
    r0 = batch_items(10, step=0, micro=0, grad_accum=1, batch_size=2, seed=1, rank=0, world=2)
    r1 = batch_items(10, step=0, micro=0, grad_accum=1, batch_size=2, seed=1, rank=1, world=2)
    assert not set(r0) & set(r1)


def test_stofm_cli_end_to_end(squidpy_crop, tmp_path, capsys):
    import anndata as ad
    import numpy as np

    from stofm.cli import main
    from stofm.model import create_model

    out = tmp_path / "cli"
    rc = main(["pretrain", "--config", str(TINY), "--data", str(squidpy_crop / "test_data.h5ad"),
               "--output-dir", str(out), "--max-steps", "3", "--save-every", "2", "--no-progress"])
    assert rc == 0
    assert "done: 3 steps" in capsys.readouterr().out
    assert sorted(_rows(out / "train_log.csv"))[-1] == 3
    assert (out / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    assert (out / "config.yaml").is_file()
    model = create_model(out / "model")
    rc = main(["embed", str(squidpy_crop / "test_data.h5ad"), "--model", str(out / "model"),
               "--out", str(tmp_path / "emb.h5ad"), "--niches", "7"])
    assert rc == 0
    emb = ad.read_h5ad(tmp_path / "emb.h5ad")
    assert emb.obsm["X_stofm"].shape == (49, model.dim) and np.isfinite(emb.obsm["X_stofm"]).all()
    assert emb.obsm["X_stofm_niche"].shape == (49, model.dim)
    assert emb.uns["stofm"]["cluster_method"] == "kmeans"


def test_stofm_cli_embed_with_leiden_virtual_cells(squidpy_crop, tmp_path):
    """`stofm embed --cluster-method leiden --virtual-cells N`: Leiden virtual cells from the command line."""
    pytest.importorskip("igraph")
    import anndata as ad
    import torch

    from stofm.cli import main

    args = ["embed", str(squidpy_crop / "test_data.h5ad"), "--model", "stofm-tiny", "--virtual-cells", "5"]
    torch.manual_seed(0)  # the same random-init model for both runs
    assert main([*args, "--cluster-method", "leiden", "--out", str(tmp_path / "leiden.h5ad")]) == 0
    torch.manual_seed(0)
    assert main([*args, "--virtual-cells", "0", "--out", str(tmp_path / "none.h5ad")]) == 0
    leiden, none = ad.read_h5ad(tmp_path / "leiden.h5ad"), ad.read_h5ad(tmp_path / "none.h5ad")
    assert leiden.uns["stofm"]["cluster_method"] == "leiden" and 4 <= leiden.uns["stofm"]["n_virtual"] <= 6
    assert none.uns["stofm"]["n_virtual"] == 0
    # the virtual cells are context every cell attends to: removing them changes the embeddings
    assert abs(leiden.obsm["X_stofm"] - none.obsm["X_stofm"]).max() > 1e-3


def test_stalign_pretrain_stofm_command(squidpy_crop, tmp_path, capsys):
    from stalign.cli import main

    out = tmp_path / "st"
    rc = main(["pretrain-stofm", "--config", str(TINY), "--data", str(squidpy_crop / "test_data.h5ad"),
               "--output-dir", str(out), "--max-steps", "2", "--no-progress"])
    assert rc == 0 and (out / "model" / "config.json").is_file()
    rc = main(["pretrain-stofm", "--config", str(TINY), "--data", str(tmp_path / "missing.h5ad"),
               "--output-dir", str(out), "--max-steps", "2"])
    assert rc == 1 and "missing.h5ad" in capsys.readouterr().err


def test_bad_config_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: stofm-tiny\nlearning_rate: 0.1\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_config(bad)
    with pytest.raises(ValueError, match="needs data"):
        pretrain(load_config(None, output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="cluster_method='louvain'"):
        load_config(None, cluster_method="louvain")


def test_gene_then_spatial_pretraining_pipeline(squidpy_crop, tmp_path, capsys):
    """stofm pretrain-cells (masked genes) -> stofm pretrain --cell-encoder (MCM + PDR) -> embed."""
    import anndata as ad
    import numpy as np

    import stofm
    from stofm.cli import main

    data = str(squidpy_crop / "test_data.h5ad")
    enc = tmp_path / "cells"
    rc = main(["pretrain-cells", data, "--out", str(enc), "--input-kind", "log1p", "--width", "16", "--depth", "1",
               "--heads", "2", "--max-len", "64", "--out-dim", "16", "--steps", "2", "--batch-size", "8"])
    assert rc == 0 and (enc / "model.safetensors").is_file()
    out = tmp_path / "spatial"
    rc = main(["pretrain", "--config", str(TINY), "--data", data, "--cell-encoder", str(enc),
               "--output-dir", str(out), "--max-steps", "2", "--no-progress"])
    assert rc == 0
    model = stofm.create_model(out / "model")
    assert model.cell_encoder.kind == "bert" and model.cell_encoder.out_dim == 16
    a = stofm.embed(ad.read_h5ad(data), model, progress=False)
    assert a.obsm["X_stofm"].shape == (49, model.dim) and np.isfinite(a.obsm["X_stofm"]).all()


def test_nan_loss_stops_naming_the_step(squidpy_crop, tmp_path, monkeypatch):
    """A NaN loss stops the run with the shared engine's error (step named, nothing saved after it)."""
    import stofm.pretrain
    from stofm.util.errors import NonFiniteLossError

    real = stofm.pretrain._step_module

    def poisoned(model, cfg):
        module = real(model, cfg)
        forward = module.forward
        module.forward = lambda batch, gen: (terms := forward(batch, gen)) | {"loss": terms["loss"] * float("nan")}
        return module

    monkeypatch.setattr(stofm.pretrain, "_step_module", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 1; .*no checkpoint"):
        pretrain(_cfg(squidpy_crop, tmp_path / "nan", max_steps=2, save_every=1))
    assert not (tmp_path / "nan" / "checkpoints").exists() and not (tmp_path / "nan" / "model").exists()
