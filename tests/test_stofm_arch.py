"""``stofm-original`` as a model config: the released shape, the original SE(2) fed from coordinates (distance
matrices and outputs equal the original code's, from the golden fixtures), the original geometry/tiling in
``prepare_slide``, and the project SE(2)'s switches for each point where the two architectures differ."""
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
    with pytest.raises(ValueError, match="switches of the project"):
        create_model("stofm-original-tiny", genes=GENES, norm="pre")


@needs_fixture
@pytest.mark.parametrize("sub", [0, 1, 2, 3])
def test_original_arch_feeds_the_original_distance_matrices(sub):
    """Node coordinates in the original frame -> the distance matrix its pipeline builds (kNN over all nodes incl.
    CLS and hypernodes, far 100, union), for every sub-slice of slice A, also with padding inside the batch."""
    from stofm.se2_original import OriginalArchSE2

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


def _project(**switches):
    from stofm.se2 import SE2Transformer

    torch.manual_seed(0)
    return SE2Transformer(dim=16, depth=2, heads=4, n_gaussians=8, k_neighbors=4, dropout=0.0, **switches).eval()


def _run(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    emb, xy = torch.randn(2, 12, 16, generator=g), torch.rand(2, 12, 2, generator=g) * 30 - 15
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1, 9:] = True
    vemb, vxy = torch.randn(2, 3, 16, generator=g), torch.rand(2, 3, 2, generator=g) * 30 - 15
    with torch.no_grad():
        return model(emb, xy, pad, vemb, vxy), (emb, xy, pad, vemb, vxy)


SWITCHES = [{"norm": "post"}, {"ffn_dim": 24}, {"gaussian_act": "relu"}, {"final_norm": False},
            {"zero_distance_mask": True}, {"gaussian_bias": "all"}, {"carry_logits": False}, {"cls": "zero"},
            {"knn_over": "all"}]


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: next(iter(s)))
def test_each_switch_of_the_project_se2_changes_the_model_and_keeps_it_sound(switch):
    """Each point the two architectures differ in is a config key of the project's SE(2): it changes the output
    (same seed, same weights where shapes agree), outputs stay finite, and rotations about the origin leave
    them unchanged."""
    base, _ = _run(_project())
    model = _project(**switch)
    if "ffn_dim" not in switch and "cls" not in switch:
        model.load_state_dict(_project().state_dict(), strict=False)
    out, (emb, xy, pad, vemb, vxy) = _run(model)
    assert torch.isfinite(out["cells"]).all()
    assert (out["cells"][~pad] - base["cells"][~pad]).abs().max() > 1e-4
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    with torch.no_grad():
        turned = model(emb, xy @ rot.T, pad, vemb, vxy @ rot.T)
    torch.testing.assert_close(turned["cells"][~pad], out["cells"][~pad], atol=1e-4, rtol=1e-4)


def test_project_se2_with_knn_over_all_builds_the_original_distances():
    from stofm.se2_original import original_distances

    model = _project(knn_over="all", far_distance=100.0)
    _, (emb, xy, pad, vemb, vxy) = _run(model)
    types = torch.tensor([1, 2, 2, 2] + [0] * 12).expand(2, -1).clone()
    types[:, 4:][pad] = 3
    nodes = torch.cat([torch.zeros(2, 1, 2), vxy, xy], 1)
    d, _, _, graph = model._distances(xy, pad, vxy, torch.zeros(2, 3, dtype=torch.bool), torch.tensor([0] * 16))
    torch.testing.assert_close(d, original_distances(nodes, types, k_neighbors=4, far=100.0))
    assert not graph[1, 9:].any()


@needs_fixture
@pytest.mark.parametrize("case", ["A", "B"])
def test_project_se2_with_every_switch_at_the_original_value_is_the_original(case):
    """The switches are exact: the project's SE(2) with ORIGINAL_SWITCHES and the fixture's weights (mapped by
    to_project_state_dict) gives the original code's outputs from coordinates (cases A and B: unit and unnormalised
    inputs, so carried logits matter)."""
    from stofm.se2 import SE2Transformer
    from stofm.se2_original import ORIGINAL_SWITCHES, to_project_state_dict

    pre, ref = _np(SE2 / f"preprocess_slice{case}.safetensors"), _np(SE2 / f"outputs_{case}.safetensors")
    sd = {k: torch.from_numpy(v) for k, v in _np(SE2 / "state_dict.safetensors").items()}
    model = SE2Transformer(dim=256, depth=2, heads=32, n_gaussians=128, k_neighbors=50, far_distance=100.0,
                           ffn_dim=768, in_dim=256, dropout=0.0, attn_impl="manual", **ORIGINAL_SWITCHES)
    model.proj_in = torch.nn.Linear(256, 256)  # the original always projects its input (in_dim == dim here)
    missing, unexpected = model.load_state_dict(to_project_state_dict(sd), strict=False)
    assert missing == ["mask_token"] and not unexpected
    model.eval()
    h = len(pre["hyper_spatial"])
    for b in (0, 1):
        cells = pre[f"sub{b}.cell_indices"]
        with torch.no_grad():
            out = model(torch.from_numpy(pre["cell_emb"][cells])[None], torch.from_numpy(pre["norm_spatial"][cells])[None],
                        None, torch.from_numpy(pre["hyper_emb"])[None], torch.from_numpy(pre["hyper_spatial"])[None])
        np.testing.assert_allclose(out["cells"][0].numpy(), ref["last_hidden_state"][b, 1 + h:1 + h + len(cells)],
                                   **TOL)
        np.testing.assert_allclose(out["cls"][0].numpy(), ref["cls_state"][b], **TOL)


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
