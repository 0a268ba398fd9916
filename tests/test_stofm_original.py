"""Golden tests: the original SToFM (PharMolix/SToFM) reproduced from its released-format weights. The fixtures in
``../shared/fixtures/stofm_original`` are outputs of the original code with small random weights (see their
README); every check is within its tolerance (1e-5, relative for the pair logits)."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stofm_original"
pytestmark = pytest.mark.skipif(not (FIX / "se2" / "state_dict.safetensors").is_file(),
                                reason=f"golden fixtures of the original SToFM not found at {FIX} (a user's checkout)")
SE2, BERT = FIX / "se2", FIX / "cell_bert"
TOL = {"atol": 1e-5, "rtol": 1e-5}


def _np(name: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(name))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture weights through ``stofm convert`` (SE(2) with heads + cell BERT), loaded back."""
    from stofm.cli import main
    from stofm.original.convert import load_converted

    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("converted") / "stofm"
    src = tmp_path_factory.mktemp("src")
    # the released layout: se2transformer.pth (torch.save of SToFMForMaskedLM) + config.json, cell_bert/
    sd = {**{f"model.{k}": torch.from_numpy(v) for k, v in _np(SE2 / "state_dict.safetensors").items()},
          **{k: torch.from_numpy(v) for k, v in _np(SE2 / "heads_state_dict.safetensors").items()}}
    torch.save(sd, src / "se2transformer.pth")
    (src / "config.json").write_text((SE2 / "config.json").read_text())
    assert main(["convert", str(src / "se2transformer.pth"), "--heads", "--cell-bert", str(BERT), "--out",
                 str(out)]) == 0
    model, cell = load_converted(out)
    return {"folder": out, "model": model, "se2": model.model, "cell": cell}


@pytest.mark.parametrize("case", ["A", "B"])
def test_se2_forward_matches_the_original(converted, case):
    inp, ref = _np(SE2 / f"inputs_{case}.safetensors"), _np(SE2 / f"outputs_{case}.safetensors")
    with torch.no_grad():
        out = converted["se2"](*(torch.from_numpy(inp[k]) for k in ("token_embeddings", "attn_bias", "token_types")),
                               details=True)
    valid = inp["token_types"] != 3
    np.testing.assert_allclose(out["last_hidden_state"].numpy()[valid], ref["last_hidden_state"][valid], **TOL)
    np.testing.assert_allclose(out["pair_rep"].numpy(), ref["pair_rep"], **TOL)
    np.testing.assert_allclose(out["attentions"].numpy(), ref["attentions"], **TOL)
    np.testing.assert_allclose(out["cls_state"].numpy(), ref["cls_state"], **TOL)
    if case == "B":  # every intermediate: embeddings, the Gaussian bias, layer 0's logits carried into layer 1
        np.testing.assert_allclose(out["hidden_states"].numpy(), ref["hidden_states"], **TOL)
        np.testing.assert_allclose(out["gaussian_bias"].numpy(), ref["gaussian_bias"], **TOL)
        np.testing.assert_allclose(out["layer_pair_reps"][0].numpy(), ref["layer0_pair_rep"], **TOL)


def test_mcm_and_pdr_heads_match_the_original(converted):
    inp, ref = _np(SE2 / "inputs_mlm.safetensors"), _np(SE2 / "outputs_mlm.safetensors")
    with torch.no_grad():
        out = converted["model"](*(torch.from_numpy(inp[k]) for k in ("token_embeddings", "attn_bias", "token_types")),
                                 labels=torch.from_numpy(inp["labels"]), pair_labels=torch.from_numpy(inp["pair_labels"]))
    np.testing.assert_allclose(out["logits"].numpy(), ref["logits"], **TOL)
    np.testing.assert_allclose(out["loss"].numpy().reshape(1), ref["loss"], **TOL)
    np.testing.assert_allclose(out["pair_pred"].numpy(), ref["pair_pred"], **TOL)
    np.testing.assert_allclose(out["pair_loss"].numpy().reshape(1), ref["pair_loss"], rtol=1e-5)


@pytest.mark.parametrize("case, split_num", [("A", 100), ("B", 25)])
def test_preprocessing_matches_the_original(case, split_num):
    """Raw coordinates -> normalised coordinates, hypernodes (Leiden labels as given), tiles, nodes, token types,
    indices and distance matrices; the collated batch equals the original collator's."""
    from stofm.original import pipeline as P

    ref = _np(SE2 / f"preprocess_slice{case}.safetensors")
    norm = P.normalize_coords(ref["raw_spatial"])
    np.testing.assert_allclose(norm, ref["norm_spatial"], atol=1e-12)
    hxy, hemb, _ = P.hypernodes(norm, ref["cell_emb"], ref["leiden_labels"])
    np.testing.assert_allclose(hxy, ref["hyper_spatial"], atol=1e-12)
    np.testing.assert_allclose(hemb, ref["hyper_emb"], **TOL)
    subs = P.build_subslices(norm, ref["cell_emb"], hxy, hemb, split_num=split_num)
    assert len(subs) == 4
    for i, s in enumerate(subs):
        np.testing.assert_array_equal(s.indices[s.indices >= 0], ref[f"sub{i}.cell_indices"])
        np.testing.assert_array_equal(s.indices, ref[f"sub{i}.indices"])
        np.testing.assert_array_equal(s.token_types, ref[f"sub{i}.token_types"])
        np.testing.assert_allclose(s.nodes, ref[f"sub{i}.nodes"], atol=1e-12)
        np.testing.assert_allclose(s.attn_bias, ref[f"sub{i}.attn_bias"], **TOL)
    batch, inp = P.collate(subs[:2]), _np(SE2 / f"inputs_{case}.safetensors")
    for key in ("token_embeddings", "attn_bias", "token_types", "indices"):
        np.testing.assert_allclose(batch[key].numpy(), inp[key], **TOL)


def test_whole_slice_embeddings_match_the_original(converted):
    """``stofm.embed`` of the converted folder as a ``stofm-original`` SToFM (the one embedding path): raw
    coordinates + the fixture's cell embeddings and Leiden labels -> the original's per-cell embeddings."""
    import anndata as ad

    from stofm.embedding import embed
    from stofm.model import create_model

    ref = _np(SE2 / "preprocess_sliceA.safetensors")
    adata = ad.AnnData(X=np.zeros((len(ref["cell_emb"]), 1), np.float32),
                       obsm={"spatial": ref["raw_spatial"], "cells": ref["cell_emb"]})
    adata.obs["leiden"] = ref["leiden_labels"]
    embed(adata, create_model(converted["folder"]), cell_key="cells", labels_key="leiden", cells_per_tile=100,
          progress=False)
    np.testing.assert_allclose(adata.obsm["X_stofm"], _np(SE2 / "slice_embeddings_A.safetensors")["stofm_emb"], **TOL)


def test_geneformer_tokens_and_cell_embeddings_match_the_original(converted):
    cell, genes = converted["cell"], json.loads((BERT / "genes.json").read_text())["genes"]
    counts, toks = _np(BERT / "counts.safetensors"), json.loads((BERT / "tokens.json").read_text())
    tokens = cell.tokenizer.rank_tokens(counts["counts"], genes)
    assert [t.tolist() for t in tokens] == toks["geneformer_tokens"]
    batch, ref = cell.tokenizer.batch(tokens), _np(BERT / "tokens.safetensors")
    np.testing.assert_array_equal(batch["input_ids"].numpy(), ref["input_ids"])
    np.testing.assert_array_equal(batch["attention_mask"].numpy(), ref["attention_mask"])
    out = _np(BERT / "outputs.safetensors")
    with pytest.warns(UserWarning, match="absent from the input"):  # 10 dictionary genes are not in the matrix
        np.testing.assert_allclose(cell.encode_cells(counts["counts"], genes).numpy(), out["cell_emb"], **TOL)
    long = toks["long_case"]  # the 2,048 cut: <cls> + the first 2,047 of Geneformer's 2,048 tokens
    ids = np.asarray(long["pre_tokenised_input_ids"])[:2048]
    assert ids.tolist() == long["after_create_dataset"]
    lb = cell.tokenizer.batch([ids])
    np.testing.assert_array_equal(lb["input_ids"].numpy(), out["long_input_ids"])
    with torch.no_grad():
        np.testing.assert_allclose(cell.embed_tokens(lb["input_ids"], lb["attention_mask"]).numpy(),
                                   out["long_cell_emb"], **TOL)


def test_geneformer_pickles_read_safely_and_equal_the_json():
    from stofm.original.cell_bert import read_dictionary

    for stem in ("token_dictionary", "gene_median_dictionary"):
        assert read_dictionary(BERT / f"{stem}.pkl") == read_dictionary(BERT / f"{stem}.json")


def test_a_pickle_carrying_code_is_refused(tmp_path):
    from stofm.original.cell_bert import read_dictionary

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "token_dictionary.pkl").write_bytes(pickle.dumps({"ENSG1": Payload()}))
    with pytest.raises(ValueError, match=r"token_dictionary\.pkl: .*refusing to load (io|builtins)\.open"):
        read_dictionary(tmp_path / "token_dictionary.pkl", what="token dictionary")
    assert not marker.exists()
    (tmp_path / "t.pkl").write_bytes(pickle.dumps({"ENSG1": 2})[:-5])
    with pytest.raises(ValueError, match=r"t\.pkl: .*damaged"):
        read_dictionary(tmp_path / "t.pkl")


def test_convert_refuses_other_architectures_and_damaged_files(tmp_path):
    from stofm.original.convert import load_original

    sd = {k: torch.from_numpy(v) for k, v in _np(SE2 / "state_dict.safetensors").items()}
    del sd["encoder.layers.1.fc2.bias"]
    sd["encoder.layers.1.extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not the SToFM architecture.*missing \['encoder\.layers\.1"
                                         r"\.fc2\.bias'\].*unexpected \['encoder\.layers\.1\.extra\.weight'\]"):
        load_original(tmp_path / "other.pth", config=SE2 / "config.json")
    data = (tmp_path / "other.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"cut\.pth: SToFM checkpoint is damaged"):
        load_original(tmp_path / "cut.pth")
    torch.save({"embedding_layer.weight": torch.zeros(4, 4)}, tmp_path / "bert.pth")
    with pytest.raises(ValueError, match=r"bert\.pth: not an SToFM SE\(2\) state dict"):
        load_original(tmp_path / "bert.pth")


def test_vocabulary_without_the_matrix_genes_is_one_error(converted):
    with pytest.raises(ValueError, match="none of the 3 genes .* Ensembl ids"):
        converted["cell"].tokenizer.rank_tokens(np.ones((2, 3)), ["Mbp", "Plp1", "Gfap"])


def test_convert_and_embed_from_the_command_line(converted, tmp_path):
    """`stofm convert` + `stofm embed` on the fixture weights: counts -> cell BERT -> original pipeline; the CLI's
    embeddings equal those of the original cell BERT's embeddings through ``stofm.embed``."""
    import anndata as ad

    from stofm.cli import main
    from stofm.embedding import embed
    from stofm.model import create_model

    genes = json.loads((BERT / "genes.json").read_text())["genes"]
    counts = _np(BERT / "counts.safetensors")["counts"].astype(np.float32)
    counts = np.concatenate([counts] * 3)  # 30 cells with coordinates
    xy = np.random.default_rng(0).uniform(0, 500, (len(counts), 2))
    adata = ad.AnnData(X=counts, obsm={"spatial": xy})
    adata.var_names = genes
    adata.obs["cluster"] = np.arange(len(counts)) % 3
    adata.write_h5ad(tmp_path / "cells.h5ad")
    assert main(["embed", str(tmp_path / "cells.h5ad"), "--model", str(converted["folder"]), "--out",
                 str(tmp_path / "out.h5ad"), "--leiden-labels", "cluster", "--cells-per-tile", "12"]) == 0
    got = ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_stofm"]
    with pytest.warns(UserWarning, match="absent from the input"):
        adata.obsm["cells"] = converted["cell"].encode_cells(counts, genes).numpy()
    expected = embed(adata, create_model(converted["folder"]), cell_key="cells", labels_key="cluster",
                     cells_per_tile=12, progress=False).obsm["X_stofm"]
    assert got.shape == (30, 256)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"obsm\['missing'\]"):
        main(["--debug", "embed", str(tmp_path / "cells.h5ad"), "--model", str(converted["folder"]), "--out",
              str(tmp_path / "x.h5ad"), "--cell-embeddings", "missing"])


def test_pretraining_batch_matches_the_original_collator(converted):
    """MCM + PDR batch of the original collator (rate 0.12, kept 0.03, -100 inputs; PDR noise sigma = 5 sqrt(area /
    cells), full distances from the moved cells, clean kNN distances as targets), same draws after the same seed;
    fed through the converted model it gives the original's losses."""
    from stofm.original import pipeline as P
    from stofm.original.masking import mask_batch

    ref, pre = _np(SE2 / "inputs_mlm.safetensors"), _np(SE2 / "preprocess_sliceA.safetensors")
    norm = P.normalize_coords(pre["raw_spatial"])
    hxy, hemb, _ = P.hypernodes(norm, pre["cell_emb"], pre["leiden_labels"])
    torch.manual_seed(1234)
    batch = mask_batch(P.build_subslices(norm, pre["cell_emb"], hxy, hemb, split_num=100)[:2])
    for key in ("token_embeddings", "labels", "token_types", "indices", "spatial"):
        np.testing.assert_allclose(batch[key].numpy(), ref[key], **TOL)
    np.testing.assert_allclose(batch["attn_bias"].numpy(), ref["attn_bias"], rtol=1e-5, atol=1e-4)  # float32 cdist
    np.testing.assert_allclose(batch["pair_labels"].numpy(), ref["pair_labels"], rtol=1e-5, atol=1e-4)
    for b, picks in enumerate(batch["picks"]):
        for key in ("mcm_masked", "mcm_kept", "pdr_masked", "pdr_kept"):
            assert picks[key].tolist() == ref[f"b{b}.{key}"].tolist(), (b, key)
        np.testing.assert_allclose(picks["pdr_noise"].numpy(), ref[f"b{b}.pdr_noise"], **TOL)
        m = len(ref[f"b{b}.noised_spatial"])
        np.testing.assert_allclose(batch["noised_spatial"][b, :m].numpy(), ref[f"b{b}.noised_spatial"], **TOL)
    with torch.no_grad():
        out = converted["model"](batch["token_embeddings"], batch["attn_bias"], batch["token_types"],
                                 labels=batch["labels"], pair_labels=batch["pair_labels"])
    losses = _np(SE2 / "outputs_mlm.safetensors")
    np.testing.assert_allclose(float(out["loss"]), float(losses["loss"][0]), rtol=1e-4)
    np.testing.assert_allclose(float(out["pair_loss"]), float(losses["pair_loss"][0]), rtol=1e-4)
