"""``stofm-original`` as a model config: the released shape, the original SE(2) fed from coordinates (distance
matrices and outputs equal the original code's, from the golden fixtures), the original geometry/tiling in
``prepare_slide``; the project SE(2) keeps no switches towards the original (old configs naming them still load)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stofm_original"
SE2 = FIX / "se2"
needs_fixture = pytest.mark.skipif(not (SE2 / "state_dict.safetensors").is_file(),
                                   reason=f"golden fixtures of the original SToFM not found at {FIX} (a user's checkout)")
TOL = {"atol": 1e-5, "rtol": 1e-5}
GENES = [f"g{i}" for i in range(20)]


def _np(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The fixture's SE(2) + heads through ``stofm convert`` (no cell BERT)."""
    from safetensors.torch import save_file

    from stofm.cli import main

    src = tmp_path_factory.mktemp("src")
    sd = {**{f"model.{k}": torch.from_numpy(v) for k, v in _np(SE2 / "state_dict.safetensors").items()},
          **{k: torch.from_numpy(v) for k, v in _np(SE2 / "heads_state_dict.safetensors").items()}}
    save_file(sd, str(src / "se2.safetensors"))
    out = tmp_path_factory.mktemp("conv") / "stofm"
    assert main(["convert", str(src / "se2.safetensors"), "--heads", "--config", str(SE2 / "config.json"),
                 "--out", str(out)]) == 0
    return out


def test_stofm_original_has_the_released_shape():
    from stofm.model import create_model, list_models

    assert {"stofm-original", "stofm-original-tiny", "stofm-tiny"} <= set(list_models())
    m = create_model("stofm-original", genes=GENES, cell_encoder_cfg={"kind": "mlp", "hidden": 8, "depth": 1})
    c = m.se2.model.config
    assert (c.hidden_size, c.num_attention_heads, c.ffn_embedding_dim, c.num_hidden_layers) == (256, 32, 768, 12)
    assert (c.activation_fn, c.pre_layernorm, m.arch) == ("gelu", False, "original")
    assert (m.se2.k_neighbors, m.se2.far_distance) == (50, 100.0)
    assert (m.config["geometry"], m.config["tiling"], m.config["cluster_method"]) == ("bbox", "original", "original")
    keys = set(m.se2.model.state_dict())  # the original's key names, separate q/k/v, no final LayerNorm
    assert "encoder.layers.11.self_attn.k_proj.weight" in keys and not any("qkv" in k for k in keys)
    with pytest.raises(ValueError, match="unknown stofm model option 'norm'"):
        create_model("stofm-original-tiny", genes=GENES, norm="pre")


@needs_fixture
@pytest.mark.parametrize("sub", [0, 1, 2, 3])
def test_original_arch_feeds_the_original_distance_matrices(sub):
    """Node coordinates in the original frame -> the distance matrix its pipeline builds (kNN over all nodes incl.
    CLS and hypernodes, far 100, union), for every sub-slice of slice A, also with padding inside the batch."""
    from stofm.original.se2 import OriginalArchSE2

    pre = _np(SE2 / "preprocess_sliceA.safetensors")
    se2 = OriginalArchSE2(dim=8, depth=1, heads=2, in_dim=256)
    cells = pre[f"sub{sub}.cell_indices"]
    extra = 3  # padded cells and one padded virtual cell, placed before real ones would be after collation
    coords = torch.zeros(1, len(cells) + extra, 2, dtype=torch.float64)
    coords[0, :len(cells)] = torch.from_numpy(pre["norm_spatial"][cells])
    pad = torch.ones(1, len(cells) + extra, dtype=torch.bool)
    pad[0, :len(cells)] = False
    hyper = torch.from_numpy(np.concatenate([pre["hyper_spatial"], [[5.0, 5.0]]]))[None]
    vpad = torch.zeros(1, len(hyper[0]), dtype=torch.bool)
    vpad[0, -1] = True
    inp = se2.inputs(torch.zeros(1, len(cells) + extra, 256), coords, pad, torch.zeros(1, len(hyper[0]), 256),
                     hyper, vpad)
    keep = (inp["token_types"][0] != 3).numpy()
    got = inp["attn_bias"][0].numpy()[np.ix_(keep, keep)]
    np.testing.assert_allclose(got, pre[f"sub{sub}.attn_bias"], atol=4e-6, rtol=0)
    assert (inp["attn_bias"][0].numpy()[~keep] == 0).all()
    np.testing.assert_array_equal(inp["token_types"][0].numpy()[keep], pre[f"sub{sub}.token_types"])


@needs_fixture
def test_stofm_original_from_converted_weights_reproduces_the_original(converted):
    """``create_model(<stofm convert folder>)`` -> SToFM(arch original): per-cell outputs of slice A's first batch
    and the MCM/PDR heads equal the original code's."""
    from stofm.model import create_model

    model = create_model(converted, genes=GENES, cell_encoder_cfg={"kind": "mlp", "hidden": 8, "depth": 1}).eval()
    assert model.arch == "original" and model.config["se2"]["depth"] == 2
    pre, ref = _np(SE2 / "preprocess_sliceA.safetensors"), _np(SE2 / "outputs_A.safetensors")
    cells = [pre[f"sub{i}.cell_indices"] for i in (0, 1)]
    n = max(len(c) for c in cells)
    emb, xy = torch.zeros(2, n, 256), torch.zeros(2, n, 2, dtype=torch.float64)
    pad = torch.ones(2, n, dtype=torch.bool)
    for b, c in enumerate(cells):
        emb[b, :len(c)] = torch.from_numpy(pre["cell_emb"][c])
        xy[b, :len(c)] = torch.from_numpy(pre["norm_spatial"][c])
        pad[b, :len(c)] = False
    h = len(pre["hyper_spatial"])
    vemb = torch.from_numpy(pre["hyper_emb"]).expand(2, -1, -1)
    vxy = torch.from_numpy(pre["hyper_spatial"]).expand(2, -1, -1)
    with torch.no_grad():
        out = model(emb, xy, pad, vemb, vxy)
    for b, c in enumerate(cells):
        np.testing.assert_allclose(out["cells"][b, :len(c)].numpy(), ref["last_hidden_state"][b, 1 + h:1 + h + len(c)],
                                   **TOL)
    np.testing.assert_allclose(out["cls"].numpy(), ref["cls_state"], **TOL)
    np.testing.assert_allclose(out["virtual"].numpy(), ref["last_hidden_state"][:, 1:1 + h], **TOL)


@needs_fixture
def test_embedding_a_converted_folder_without_cell_bert_needs_cell_embeddings(converted, tmp_path):
    """No cell BERT in the folder and no ``--cell-embeddings``: one error (not a random cell encoder); with them
    the SE(2) embeds the given 256-d cell embeddings."""
    import anndata as ad

    from stofm.cli import main

    rng = np.random.default_rng(0)
    a = ad.AnnData(X=np.ones((12, len(GENES)), np.float32),
                   obsm={"spatial": rng.uniform(0, 50, (12, 2)), "cells": rng.normal(size=(12, 256))})
    a.var_names = GENES
    a.obs["c"] = np.arange(12) % 2
    a.write_h5ad(tmp_path / "a.h5ad")
    cmd = ["--debug", "embed", str(tmp_path / "a.h5ad"), "--model", str(converted), "--out", str(tmp_path / "o.h5ad")]
    with pytest.raises(ValueError, match=r"has no cell BERT: give precomputed cell embeddings \(--cell-embeddings"):
        main(cmd)
    assert main([*cmd, "--cell-embeddings", "cells", "--leiden-labels", "c"]) == 0
    out = ad.read_h5ad(tmp_path / "o.h5ad")
    assert out.obsm["X_stofm"].shape == (12, 256) and out.uns["stofm"]["n_virtual"] == 2


@needs_fixture
def test_prepare_slide_uses_the_original_geometry_and_tiles():
    """geometry 'bbox' = the original's normalised coordinates; tiling 'original' = its sub-slices (slice A)."""
    import anndata as ad

    from stofm.embedding import prepare_slide
    from stofm.model import create_model

    pre = _np(SE2 / "preprocess_sliceA.safetensors")
    rng = np.random.default_rng(0)
    a = ad.AnnData(X=rng.poisson(1.0, (110, len(GENES))).astype(np.float32),
                   obsm={"spatial": pre["raw_spatial"]})
    a.var_names = GENES
    model = create_model("stofm-original-tiny", genes=GENES, cells_per_tile=100)
    slide = prepare_slide(a, model, cluster_method="kmeans", n_virtual=4)
    np.testing.assert_allclose(slide.coords.numpy(), pre["norm_spatial"], atol=1e-5)
    assert [list(t) for t in slide.tiles] == [list(pre[f"sub{i}.cell_indices"]) for i in range(4)]
    project = prepare_slide(a, create_model("stofm-tiny", genes=GENES), cluster_method="kmeans", n_virtual=4)
    assert float(project.coords.max(0).values.min()) > 0  # the project's frame starts at 0, diameter 100


def test_configs_naming_the_retired_switches_at_project_values_still_build():
    """A project SE(2) config saved while it had switches towards the original (norm, cls, knn_over, ...) builds
    the same model when they hold the project's values; any other value is one error pointing at arch 'original'."""
    from stofm.se2 import RETIRED, SE2Transformer

    torch.manual_seed(0)
    plain = SE2Transformer(dim=16, depth=1, heads=4, n_gaussians=8)
    torch.manual_seed(0)
    old = SE2Transformer(dim=16, depth=1, heads=4, n_gaussians=8, **RETIRED)
    assert plain.state_dict().keys() == old.state_dict().keys()
    with pytest.raises(ValueError, match=r"no option \['norm'\].*arch 'original'"):
        SE2Transformer(dim=16, depth=1, heads=4, norm="post")


@needs_fixture
def test_converted_cell_bert_is_the_cell_encoder_of_the_model(tmp_path):
    """A convert folder with the cell BERT gives an SToFM whose cell encoder (kind 'geneformer') reproduces the
    original cell embeddings from counts, and from log1p cp10k (same tokens); save_pretrained keeps it."""
    import json

    pytest.importorskip("transformers")
    from stofm.cli import main
    from stofm.model import create_model

    bert = FIX / "cell_bert"
    out = tmp_path / "conv"
    assert main(["convert", str(SE2 / "state_dict.safetensors"), "--config", str(SE2 / "config.json"),
                 "--cell-bert", str(bert), "--out", str(out)]) == 0
    model = create_model(out).eval()
    assert model.cell_encoder.kind == "geneformer" and len(model.genes) == 300
    counts = _np(bert / "counts.safetensors")["counts"].astype(np.float32)
    genes = json.loads((bert / "genes.json").read_text())["genes"]
    want = _np(bert / "outputs.safetensors")["cell_emb"]
    with pytest.warns(UserWarning, match="absent from the input"):
        got = model.encode_cells(counts, genes, input_kind="counts")
    np.testing.assert_allclose(got.numpy(), want, **TOL)
    log1p = np.log1p(counts / counts.sum(1, keepdims=True).clip(1) * 1e4)
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(model.encode_cells(log1p, genes, input_kind="log1p").numpy(), want, **TOL)
    again = create_model(model.save_pretrained(tmp_path / "saved")).eval()
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(again.encode_cells(counts, genes).numpy(), want, **TOL)
    torch.testing.assert_close(again.se2.model.encoder.layers[1].fc1.weight, model.se2.model.encoder.layers[1].fc1.weight)
