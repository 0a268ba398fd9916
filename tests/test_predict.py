"""Whole-slide prediction on the real Visium crop with a tiny model: genes/shape/order, exact retrieval of the
shards' own crops, few-shot heads, bad input; and the user commands end to end."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def setup(predict_setup):
    return predict_setup


def _shard(setup):
    return setup["shard"]


def test_predictions_have_the_requested_genes_in_order_and_retrieve_their_own_crops(setup):
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.predict import predict_slide
    from stalign.tasks.retrieval import ReferenceBank

    shard, model, genes = _shard(setup), setup["model"], setup["manifest"]["genes"]
    mpp = setup["manifest"]["slides"][0]["um_per_px"]
    query = [genes[5], genes[0], genes[11]]
    out = predict_slide(model, setup["image"], reference=setup["shards"], coords=shard["coords_px"],
                        barcodes=list(shard["barcodes"]), um_per_px=mpp, genes=query, k=3, progress=False)
    assert list(out.var_names) == query and out.shape == (len(shard["coords_px"]), 3)
    assert list(out.obs_names) == list(shard["barcodes"])
    np.testing.assert_array_equal(out.X, out.layers["zero_shot"])
    np.testing.assert_array_equal(out.obsm["spatial"], shard["coords_px"])
    assert out.obsm["X_stalign"].shape == (out.n_obs, model.config.embed_dim)
    s = out.uns["stalign"]
    assert s["pixel_size_source"] == "user flag" and s["spot_um"] == 112 and s["patch_px"] == 32
    # the slide crops of predict are the shards' crops: an image-embedding bank of the shards, k=1, returns
    # each spot's own expression, in the requested gene order
    emb = embed_shards(model, setup["shards"], gene=False, progress=False)
    bank = ReferenceBank(embeddings=emb["image"], expression=emb["expression"], genes=genes)
    own = predict_slide(model, setup["image"], reference=bank, coords=shard["coords_px"], um_per_px=mpp,
                        genes=query, k=1, progress=False)
    np.testing.assert_allclose(own.X, shard["expr"][:, [genes.index(g) for g in query]].astype(np.float32),
                               atol=1e-6)


def test_tiling_fewshot_head_and_heatmaps(setup, tmp_path):
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.fewshot import ExpressionProbe
    from stalign.tasks.predict import predict_slide, write_heatmaps

    model, genes = setup["model"], setup["manifest"]["genes"]
    emb = embed_shards(model, setup["shards"], gene=False, progress=False)
    head = ExpressionProbe(genes=genes[:6], latent_dim=8).fit(emb["image"], emb["expression"][:, :6])
    out = predict_slide(model, setup["image"], reference=setup["shards"], fewshot_head=head, genes=genes[:6],
                        um_per_px=setup["manifest"]["slides"][0]["um_per_px"], step_um=150, progress=False)
    assert out.uns["stalign"]["tiled"] and out.n_obs > 10 and out.uns["stalign"]["X"] == "fewshot"
    np.testing.assert_array_equal(out.X, out.layers["fewshot"])
    assert out.layers["zero_shot"].shape == out.X.shape
    paths = write_heatmaps(out, setup["image"], genes[:2], tmp_path, thumb_size=256)
    assert len(paths) == 2 and all(p.stat().st_size > 5000 for p in paths)


def test_bad_input_gets_clear_errors(setup, tmp_path):
    from PIL import Image

    from stalign.data.errors import PixelSizeError
    from stalign.tasks.predict import NoTissueError, predict_slide
    from stalign.tasks.retrieval import GenePanelError, ReferenceBank

    model, genes = setup["model"], setup["manifest"]["genes"]
    coords = np.array([[500.0, 800.0]])
    with pytest.raises(GenePanelError, match="NotAGene, Xist2"):
        predict_slide(model, setup["image"], reference=setup["shards"], coords=coords, um_per_px=0.6,
                      genes=[genes[0], "NotAGene", "Xist2"], progress=False)
    other = ReferenceBank(embeddings=np.ones((3, 32)), expression=np.ones((3, 2)), genes=["A", "B"])
    with pytest.raises(GenePanelError, match="another gene panel"):
        predict_slide(model, setup["image"], reference=other, coords=coords, um_per_px=0.6, progress=False)
    with pytest.raises(PixelSizeError, match="um_per_px"):
        predict_slide(model, setup["image"], reference=setup["shards"], coords=coords, progress=False)
    blank = tmp_path / "blank.png"
    Image.new("RGB", (600, 400), (255, 255, 255)).save(blank)
    with pytest.raises(NoTissueError, match="no tissue"):
        predict_slide(model, blank, reference=setup["shards"], um_per_px=0.5, progress=False)
    with pytest.raises(ValueError, match="reference"):
        predict_slide(model, setup["image"], coords=coords, um_per_px=0.6, progress=False)


def test_commands_end_to_end(setup, tmp_path, capsys):
    import anndata as ad

    from stalign.cli import main

    ckpt, shards, image, genes = str(setup["ckpt"]), str(setup["shards"]), str(setup["image"]), setup["manifest"]["genes"]
    import pandas as pd

    mpp = str(setup["manifest"]["slides"][0]["um_per_px"])
    spots = ad.read_h5ad(setup["h5ad"])[:12]
    pd.DataFrame({"barcode": spots.obs_names, "x": spots.obsm["spatial"][:, 0], "y": spots.obsm["spatial"][:, 1]}
                 ).to_csv(tmp_path / "spots.csv", index=False)
    common = ["--model", ckpt, "--slide", image, "--um-per-px", mpp, "--coords", str(tmp_path / "spots.csv"),
              "--workers", "0", "--quiet"]
    assert main(["predict", *common, "--reference", shards, "--out", str(tmp_path / "pred.h5ad"),
                 "--genes", genes[2], genes[1], "--k", "5", "--heatmaps", str(tmp_path / "maps")]) == 0
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(pred.var_names) == [genes[2], genes[1]] and list(pred.obs_names) == list(spots.obs_names)
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == sorted(f"{g}.png" for g in genes[2:0:-1])
    assert main(["retrieve", "bank", "--model", ckpt, "--shards", shards, "--out", str(tmp_path / "bank"),
                 "--workers", "0", "--quiet"]) == 0
    assert main(["retrieve", "image", *common, "--reference", str(tmp_path / "bank"), "--k", "3",
                 "--out", str(tmp_path / "hits.csv")]) == 0
    hits = pd.read_csv(tmp_path / "hits.csv")
    assert len(hits) == 12 * 3 and {"query_spot", "similarity", "slide_id"} <= set(hits.columns)
    assert main(["retrieve", "signature", *common, "--reference", str(tmp_path / "bank"), "--genes", genes[0],
                 genes[3], "--out", str(tmp_path / "sig.png")]) == 0
    assert (tmp_path / "sig.png").stat().st_size > 5000 and len(pd.read_csv(tmp_path / "sig.csv")) == 12
    sig = ad.read_h5ad(tmp_path / "sig.h5ad")  # scanpy-ready: scores, images and scale factors
    assert sig.obs["signature_score"].shape == (12,) and "not expression" in sig.uns["stalign"]["X"]
    assert sig.uns["stalign"]["library_id"] in sig.uns["spatial"]
    assert main(["domains", "--h5ad", str(tmp_path / "pred.h5ad"), "--n-domains", "2", "--annotations",
                 f"{setup['h5ad']}:leiden", "--slide", image, "--out", str(tmp_path / "domains.png")]) == 0
    assert "ARI" in capsys.readouterr().out and (tmp_path / "domains.png").stat().st_size > 5000
    domains = ad.read_h5ad(tmp_path / "domains.h5ad")  # the prediction's images and scale factors carried over
    assert "stalign_domain" in domains.obs and set(domains.uns["spatial"]) == {"test_img"}
    assert main(["fewshot", "--model", ckpt, "--shards", shards, "--out", str(tmp_path / "head"),
                 "--latent-dim", "8", "--quiet"]) == 0
    assert "Pearson" in capsys.readouterr().out
    assert main(["predict", *common, "--fewshot-head", str(tmp_path / "head"), "--out", str(tmp_path / "fs.h5ad"),
                 "--heatmap-genes", "none"]) == 0
    assert ad.read_h5ad(tmp_path / "fs.h5ad").uns["stalign"]["X"] == "fewshot"
    assert main(["bench", "--shards", shards, "--encoders", f"model:{ckpt}", "random:timm:test_vit", "--by", "spot",
                 "--genes", "10", "--latent-dim", "16", "--out", str(tmp_path / "bench.csv"), "--quiet"]) == 0
    table = pd.read_csv(tmp_path / "bench.csv")
    encoders = table[table["kind"] == "encoder"]
    assert list(encoders["encoder"]) == [f"model:{ckpt}", "random:timm:test_vit"] and (table["n_folds"] == 5).all()
    assert main(["bench", "--shards", shards, "--encoders", f"model:{ckpt}", "--quiet"]) == 1  # one slide of 49 spots: too few blocks
    assert "one slide only" in capsys.readouterr().err


@pytest.mark.parametrize("unfreeze_last", [0, 1])
def test_finetune_head_frozen_or_partly_unfrozen(setup, unfreeze_last):
    import stalign
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.fewshot import finetune_expression

    model = stalign.load_checkpoint(setup["ckpt"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    genes = setup["manifest"]["genes"][:5]
    head = finetune_expression(model, setup["shards"], genes=genes, unfreeze_last=unfreeze_last, hidden=32,
                               epochs=4, lr=3e-3, encoder_lr=1e-3, batch_size=16, progress=False)
    assert len(head.history) == 4 and head.history[-1] < head.history[0]
    changed = {k for k, v in model.state_dict().items() if not bool((v == before[k]).all())}
    if unfreeze_last:
        assert changed and all("image_encoder" in k for k in changed)  # only the image trunks' last blocks
    else:
        assert not changed  # encoders frozen: the model is untouched
    emb = embed_shards(model, setup["shards"], gene=False, progress=False)["image"]
    assert head.predict(emb).shape == (len(emb), 5)


def test_fewshot_command_finetunes_and_saves_model_and_head(setup, tmp_path, capsys):
    from stalign.cli import main
    from stalign.tasks.fewshot_io import load_head

    assert main(["fewshot", "--model", str(setup["ckpt"]), "--shards", str(setup["shards"]), "--out",
                 str(tmp_path / "ft"), "--kind", "finetune", "--unfreeze-last", "1", "--epochs", "2", "--hidden", "16",
                 "--quiet"]) == 0
    assert "training MSE" in capsys.readouterr().out
    head = load_head(tmp_path / "ft")
    assert (tmp_path / "ft" / "model" / "model.safetensors").is_file() and head.embedding_info["unfreeze_last"] == 1


def test_heldout_table_and_parallel_readers(setup):
    from stalign.data.crop_spec import CropSpec
    from stalign.data.slide import open_slide
    from stalign.tasks.bench import heldout_table
    from stalign.tasks.embed import SlideCrops, embed_slide_crops

    table = heldout_table(setup["model"], setup["shards"], train=np.arange(0, 49, 2), test=np.arange(1, 49, 2),
                          image_spec="random:timm:test_vit", latent_dim=8, progress=False)
    assert list(table["method"])[:3] == ["zero-shot retrieval (k=10)", "few-shot ridge on stalign embeddings",
                                         "mean expression"]
    assert np.isnan(table.loc[2, "pearson_mean"]) and (table["n_test"] == 24).all() and np.isfinite(table["mse"]).all()
    with pytest.raises(ValueError, match="overlap"):
        heldout_table(setup["model"], setup["shards"], train=[0, 1], test=[1, 2], image_spec=None)
    slide = open_slide(setup["image"], um_per_px=setup["manifest"]["slides"][0]["um_per_px"])
    crops = SlideCrops(slide=slide, centers_px=[[300.0, 500.0], [600.0, 900.0], [400.0, 700.0]],
                       crop=CropSpec(spot_um=180 * slide.um_per_px, niche_um=540 * slide.um_per_px, patch_px=32))
    serial = embed_slide_crops(setup["model"], crops, batch_size=2, workers=0, progress=False)
    parallel = embed_slide_crops(setup["model"], crops, batch_size=2, workers=2, progress=False)
    np.testing.assert_allclose(parallel, serial, rtol=1e-5, atol=1e-6)


def test_pyramidal_wsi_through_openslide_tiles_and_reports_its_pixel_size(fetched):
    import torch

    import stalign
    from stalign.data.errors import PixelSizeError
    from stalign.tasks.predict import predict_slide
    from stalign.tasks.retrieval import ReferenceBank

    wsi = fetched("openslide-fixtures") / "boxes.tiff"  # 4-level pyramidal TIFF whose resolution tags are a dpi
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=["A", "B", "C"])
    rng = np.random.default_rng(0)
    bank = ReferenceBank(embeddings=rng.normal(size=(20, 32)), expression=rng.random((20, 3)), genes=["A", "B", "C"],
                         info={"spot_um": 20, "niche_um": 60, "patch_px": 32})
    with pytest.raises(PixelSizeError, match="boxes.tiff: no pixel size"):
        predict_slide(model, wsi, reference=bank, progress=False)
    out = predict_slide(model, wsi, reference=bank, um_per_px=0.5, genes=["C", "A"], k=5, progress=False)
    assert out.n_obs > 5 and list(out.var_names) == ["C", "A"] and out.uns["stalign"]["tiled"]
    assert out.uns["stalign"]["pixel_size_source"] == "user flag" and "ignored" in out.uns["stalign"]["pixel_size_note"]
    xy = out.obsm["spatial"]
    assert (xy >= 0).all() and (xy[:, 0] < 300).all() and (xy[:, 1] < 250).all()
    assert (out.X >= 0).all() and (out.X <= 1).all()  # weighted means of the bank's expression in [0, 1)


def test_heatmap_circles_follow_the_given_spot_diameter(tmp_path, squidpy_crop):
    import anndata as ad
    from PIL import Image

    from stalign.tasks.predict import write_heatmaps

    real = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    genes = list(real.var_names[:1])
    x = real[:, genes].X
    out = ad.AnnData(X=np.asarray(x.toarray() if hasattr(x, "toarray") else x, np.float32), obsm={"spatial": real.obsm["spatial"]},
                     var=real.var.iloc[:1].copy(), uns={"stalign": {"um_per_px": 55 / 89.44}})
    out.var_names = genes
    small, large = (np.asarray(Image.open(write_heatmaps(out, squidpy_crop / "test_img.jpg", genes, tmp_path / str(d),
                                                         spot_diameter_px=d)[0]).convert("RGB"), np.int16)
                    for d in (30.0, 89.44))
    # wider circles cover more of the H&E: the two maps differ in many pixels
    assert small.shape == large.shape and (np.abs(small - large).sum(axis=-1) > 30).mean() > 0.05
