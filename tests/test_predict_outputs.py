"""What `stalign predict` writes and checks: scverse-complete outputs, spots outside the slide, damaged weights,
inputs checked before the heavy work, the cached reference bank; `stalign heatmaps` and `stalign bench` on the
same set-up (the real Visium crop, a tiny model)."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def setup(predict_setup):
    return predict_setup


def _shard(setup):
    return setup["shard"]


def test_spots_outside_the_slide_are_flagged_and_warned_about(setup):
    from stalign.tasks.predict import predict_slide

    shard = _shard(setup)
    mpp = setup["manifest"]["slides"][0]["um_per_px"]
    coords = np.concatenate([shard["coords_px"][:3], [[-5000.0, 100.0], [1e6, 1e6]]])
    with pytest.warns(UserWarning, match=r"2 of 5 spot centres lie outside .*obs\['outside_image'\]"):
        out = predict_slide(setup["model"], setup["image"], reference=setup["shards"], coords=coords, um_per_px=mpp,
                            k=3, progress=False)
    assert out.obs["outside_image"].tolist() == [False, False, False, True, True]
    with pytest.raises(ValueError, match="NaN/inf"):
        predict_slide(setup["model"], setup["image"], reference=setup["shards"], coords=[[np.nan, 1.0]],
                      um_per_px=mpp, progress=False)


def test_damaged_weights_never_become_nan_predictions(setup, tmp_path, capsys):
    """Random bytes written into model.safetensors: the load is refused, nothing is written, exit 1; a model
    with NaN weights that slips past loading is stopped before the h5ad is written."""
    import shutil

    import torch

    from stalign.cli import main
    from stalign.tasks.predict import predict_slide

    ckpt = tmp_path / "ckpt"
    shutil.copytree(setup["ckpt"], ckpt)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = np.random.default_rng(0).bytes(4096)
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    out = tmp_path / "p.h5ad"
    rc = main(["predict", "--model", str(ckpt), "--slide", str(setup["image"]), "--um-per-px", "0.6149",
               "--reference", str(setup["shards"]), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "model.safetensors: model weights is damaged" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    model = setup["model"]
    poisoned = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "proj" in n).fill_(float("nan"))
        with pytest.raises(ValueError, match="predictions are NaN/inf"):
            predict_slide(model, setup["image"], reference=setup["shards"], coords=_shard(setup)["coords_px"][:4],
                          um_per_px=0.6149, k=3, progress=False)
    finally:
        model.load_state_dict(poisoned)


def test_predict_checks_every_input_before_embedding_the_reference(setup, tmp_path, capsys, monkeypatch):
    from stalign.cli import main
    from stalign.tasks import embed

    def no_embedding(*args, **kwargs):
        raise AssertionError("the reference was embedded before the inputs were checked")

    monkeypatch.setattr(embed, "load_reference", no_embedding)
    out = tmp_path / "p.h5ad"
    rc = main(["predict", "--model", str(setup["ckpt"]), "--slide", str(tmp_path / "missing.svs"),
               "--reference", str(setup["shards"]), "--out", str(out), "--heatmap-genes", "NotAGene", "--k", "0",
               "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "3 problem(s)" in err and "missing.svs" in err and "NotAGene" in err and "--k" in err
    assert not out.exists()


def test_prediction_plots_in_scanpy_and_carries_the_coords_obs(setup, tmp_path, capsys):
    """`stalign predict` writes AnnData that scanpy.pl.spatial plots unchanged (uns['spatial'][library_id] with
    hires/lowres images and scale factors, obsm['spatial'] in full-res px), with the --coords obs carried over and
    uns['stalign'] saying what X holds (the crop's expression is given normalised)."""
    import anndata as ad
    import matplotlib

    matplotlib.use("Agg")
    sc = pytest.importorskip("scanpy")
    from stalign.cli import main

    coords = ad.read_h5ad(setup["h5ad"])
    coords.obs["region"] = np.where(np.arange(coords.n_obs) % 2, "cortex", "striatum")
    coords.write_h5ad(tmp_path / "coords.h5ad")
    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(setup["ckpt"]), "--slide", str(setup["image"]), "--um-per-px", "0.6149",
                 "--reference", str(setup["shards"]), "--coords", str(tmp_path / "coords.h5ad"), "--out", str(out),
                 "--heatmap-genes", "none", "--quiet"]) == 0
    pred = ad.read_h5ad(out)
    lib = pred.uns["stalign"]["library_id"]
    assert lib == "test_img" and set(pred.uns["spatial"]) == {lib}
    space = pred.uns["spatial"][lib]
    assert space["images"]["hires"].ndim == 3 and max(space["images"]["lowres"].shape[:2]) <= 600
    from scipy.spatial import cKDTree

    xy = coords.obsm["spatial"].astype(float)
    pitch_px = float(np.median(cKDTree(xy).query(xy, k=2)[0][:, 1]))  # Visium: spots 55 µm wide at a 100 µm pitch
    assert space["scalefactors"]["spot_diameter_fullres"] == pytest.approx(0.55 * pitch_px)
    assert 0.55 * pitch_px < 112 / 0.6149  # not the crop width: circles would overlap
    assert list(pred.obs["region"]) == list(coords.obs["region"])
    assert "given already normalised" in pred.uns["stalign"]["units"] and pred.uns["stalign"]["pixel_size_source"] == "user flag"
    gene = str(pred.var_names[0])
    sc.pl.spatial(pred, color=[gene, "region"], show=False)  # scanpy finds the image, scale and spot size itself
    import matplotlib.pyplot as plt

    plt.savefig(tmp_path / "spatial.png")
    assert (tmp_path / "spatial.png").stat().st_size > 10_000


def test_spot_diameter_can_be_given(setup, tmp_path):
    import anndata as ad

    from stalign.cli import main

    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(setup["ckpt"]), "--slide", str(setup["image"]), "--um-per-px", "0.6149",
                 "--reference", str(setup["shards"]), "--coords", str(setup["h5ad"]), "--out", str(out),
                 "--spot-diameter-um", "55", "--heatmap-genes", "none", "--quiet"]) == 0
    pred = ad.read_h5ad(out)
    lib = pred.uns["stalign"]["library_id"]
    assert pred.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(55 / 0.6149)
    assert pred.uns["stalign"]["spot_diameter_um"] == 55


def test_heatmaps_command_redraws_from_a_prediction(setup, tmp_path, capsys):
    from stalign.cli import main

    out = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(setup["ckpt"]), "--slide", str(setup["image"]), "--um-per-px", "0.6149",
                 "--reference", str(setup["shards"]), "--out", str(out), "--heatmap-genes", "none", "--quiet"]) == 0
    genes = setup["manifest"]["genes"][:2]
    assert main(["heatmaps", str(out), "--genes", *genes, "--out", str(tmp_path / "maps")]) == 0
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == sorted(f"{g}.png" for g in genes)
    assert main(["heatmaps", str(out), "--genes", "NotAGene", "--out", str(tmp_path / "m2")]) == 1
    assert "NotAGene" in capsys.readouterr().err and not (tmp_path / "m2").exists()


def test_bench_keeps_rows_when_an_encoder_fails_and_takes_any_panel(setup, tmp_path, capsys):
    """A model checkpoint of another gene panel is fine for bench (image features only); a failing encoder is
    reported, and the rows already computed are kept in the table and the CSV."""
    import pandas as pd
    import torch

    import stalign
    from stalign.cli import main
    from stalign.models.factory import save_checkpoint

    torch.manual_seed(1)
    other = save_checkpoint(stalign.create_model("stalign-tiny", genes=["g1", "g2", "g3"]), tmp_path / "other")
    out = tmp_path / "bench.csv"
    rc = main(["bench", "--shards", str(setup["shards"]), "--by", "spot", "--folds", "2", "--genes", "5",
               "--latent-dim", "8", "--quiet", "--out", str(out), "--encoders", f"model:{other}", "no-such-encoder"])
    err = capsys.readouterr().err
    assert rc == 1 and "encoder no-such-encoder failed" in err
    written = pd.read_csv(out)
    assert written.loc[written["kind"] == "encoder", "encoder"].tolist() == [f"model:{other}"]


def test_predict_reuses_the_reference_bank_it_embedded(setup, tmp_path, monkeypatch):
    """A shards reference is embedded once per (model weights, shards): later predictions read its embeddings from
    the feature store beside the shards; changed shards are embedded again; --no-cache (cache=False) embeds."""
    import os
    import shutil

    import stalign
    from stalign.tasks import embed
    from stalign.tasks.predict import predict_slide

    shards = tmp_path / "shards"
    shutil.copytree(setup["shards"], shards, ignore=shutil.ignore_patterns("features"))  # no other test's store
    model = stalign.load_checkpoint(setup["ckpt"])
    coords = _shard(setup)["coords_px"][:5]
    kw = dict(reference=shards, coords=coords, um_per_px=0.6149, k=3, progress=False)
    first = predict_slide(model, setup["image"], **kw)
    assert len(list((shards / "features").rglob("gene-*.npy"))) == 1
    real = embed._embed_dataset

    def no_embedding(*args, **kwargs):
        raise AssertionError("the reference was embedded again")

    monkeypatch.setattr(embed, "_embed_dataset", no_embedding)
    again = predict_slide(model, setup["image"], **kw)
    np.testing.assert_array_equal(again.X, first.X)
    with pytest.raises(AssertionError, match="embedded again"):
        predict_slide(model, setup["image"], cache=False, **kw)
    shard = next((shards / "shards").glob("*.h5"))
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the shards changed: embedded again
    with pytest.raises(AssertionError, match="embedded again"):
        predict_slide(model, setup["image"], **kw)
    monkeypatch.setattr(embed, "_embed_dataset", real)
    np.testing.assert_array_equal(predict_slide(model, setup["image"], **kw).X, first.X)
    assert len(list((shards / "features").rglob("gene-*.npy"))) == 1  # the stale entry replaced
