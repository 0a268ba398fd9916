"""Issue 25, the rest: inputs that ended in a traceback, a late error or an unclear one. Each case: exit 1, one line
on stderr naming the file or value, no traceback, nothing written at the output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stofm.util.errors import InputError

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stofm_original"


def _barcodes(shards: Path) -> list[str]:
    from stalign.data.shards import read_manifest, read_shard

    entry = read_manifest(shards)["slides"][0]
    return [str(b) for b in read_shard(shards / entry["shard"])["barcodes"]]


# ----------------------------------------------------------------------------------------------- genes and labels
def test_a_gene_asked_twice_is_refused_before_predicting(tmp_path, one_line, predict_setup):
    gene = predict_setup["manifest"]["genes"][0]
    out = tmp_path / "p.h5ad"
    one_line(["predict", "--model", str(predict_setup["ckpt"]), "--h5ad", str(predict_setup["h5ad"]),
              "--image", str(predict_setup["image"]), "--reference", str(predict_setup["shards"]),
              "--out", str(out), "--genes", gene, gene, "--quiet"], repr(gene), "twice")
    assert not list(tmp_path.iterdir())


def test_fewshot_labels_all_empty_is_one_line_and_na_words_are_announced(tmp_path, one_line, predict_setup):
    from stalign.tasks.fewshot import read_spot_labels

    shards, barcodes = predict_setup["shards"], _barcodes(predict_setup["shards"])
    empty = tmp_path / "empty.csv"
    empty.write_text("barcode,label\n" + "".join(f"{b},\n" for b in barcodes))
    one_line(["fewshot", "--model", str(predict_setup["ckpt"]), "--shards", str(shards), "--out",
              str(tmp_path / "head"), "--kind", "prototype", "--labels", str(empty), "--quiet"],
             "empty.csv", "none of its 49 rows has a label")
    assert not (tmp_path / "head").exists()
    words = ["A", "B", "NA", "None", "n/a", " "]
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("barcode,label\n" + "".join(f"{b},{words[i % 6]}\n" for i, b in enumerate(barcodes)))
    with pytest.warns(UserWarning, match=r"mixed\.csv: 24 spots labelled 'NA', 'None', 'n/a' are read as unlabelled"):
        index, labels = read_spot_labels(mixed, shards)
    assert sorted(set(labels)) == ["A", "B"] and len(index) == 17  # 9 A + 8 B of 49


# ------------------------------------------------------------------------------------------------- heat maps
def test_heatmaps_of_a_prediction_with_sparse_values(tmp_path, one_line, predict_setup):
    import anndata as ad
    from scipy import sparse

    from stalign.cli import main

    pred = tmp_path / "p.h5ad"
    assert main(["predict", "--model", str(predict_setup["ckpt"]), "--h5ad", str(predict_setup["h5ad"]),
                 "--image", str(predict_setup["image"]), "--reference", str(predict_setup["shards"]),
                 "--out", str(pred), "--heatmap-genes", "none", "--quiet"]) == 0
    a = ad.read_h5ad(pred)
    dense = np.asarray(a.X)
    a.X = sparse.csr_matrix(dense)
    a.write_h5ad(tmp_path / "sparse.h5ad")
    genes = list(a.var_names[:2])
    for name in ("p", "sparse"):
        assert main(["heatmaps", str(tmp_path / f"{name}.h5ad"), "--genes", *genes, "--out",
                     str(tmp_path / f"maps_{name}")]) == 0
    for gene in genes:  # the same pictures from sparse and dense values
        assert (tmp_path / "maps_p" / f"{gene}.png").read_bytes() == (tmp_path / "maps_sparse" / f"{gene}.png"
                                                                      ).read_bytes()


# ------------------------------------------------------------------------------------------ config value types
@pytest.mark.parametrize(("overrides", "needle"), [
    ({"dropout": "high"}, "dropout='high' is not a number"), ({"heads": 0}, "heads=0"),
    ({"spot_image": {"freeze": "yes"}}, "freeze='yes' is not true/false"), ({"gene": 3}, "gene=3 is not a mapping"),
    ({"tokens": 2.5}, "tokens=2.5 is not an integer"), ({"dropout": 1.5}, "dropout=1.5")])
def test_model_overrides_are_checked_against_the_config_types(overrides, needle):
    import stalign

    with pytest.raises(InputError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        stalign.create_model("stalign-tiny", n_genes=4, **overrides)


def test_train_names_an_override_of_the_wrong_type(tmp_path, one_line, predict_setup):
    one_line(["train", "--data", str(predict_setup["shards"]), "--output-dir", str(tmp_path / "run"),
              "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml"),
              "model_overrides.dropout=high"], "overrides ['dropout']", "dropout='high' is not a number")
    assert not (tmp_path / "run").exists()


def _released_layout(tmp_path: Path, config: dict | None = None) -> Path:
    """``se2transformer.pth`` + ``config.json`` as SToFM released them (the fixture weights)."""
    import torch
    from safetensors.torch import load_file

    src = tmp_path / "src"
    src.mkdir()
    torch.save(load_file(str(FIX / "se2" / "state_dict.safetensors")), src / "se2transformer.pth")
    cfg = {**json.loads((FIX / "se2" / "config.json").read_text()), **(config or {})}
    (src / "config.json").write_text(json.dumps(cfg))
    return src


@pytest.mark.parametrize(("config", "needle"), [({"num_attention_heads": 0}, "num_attention_heads=0"),
                                                 ({"hidden_size": "eight"}, "hidden_size='eight' is not an integer"),
                                                 ({"dropout": 2.0}, "dropout=2.0")])
def test_stofm_convert_names_a_bad_config_value(tmp_path, one_line, config, needle):
    src = _released_layout(tmp_path, config)
    one_line(["convert", str(src / "se2transformer.pth"), "--out", str(tmp_path / "out")], "config.json",
             needle, program="stofm")
    assert not (tmp_path / "out").exists()


def test_a_cell_bert_carrying_pickled_code_is_refused_in_one_line(tmp_path, one_line):
    import os

    import anndata as ad
    import torch

    from stofm.cli import main

    pytest.importorskip("transformers")
    src, out = _released_layout(tmp_path), tmp_path / "converted"
    assert main(["convert", str(src / "se2transformer.pth"), "--cell-bert", str(FIX / "cell_bert"), "--out",
                 str(out)]) == 0

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    (out / "cell_bert" / "model.safetensors").unlink()
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(2, 2), "x": Payload()},
               out / "cell_bert" / "pytorch_model.bin")
    genes = json.loads((FIX / "cell_bert" / "genes.json").read_text())["genes"]
    rng = np.random.default_rng(0)
    ad.AnnData(X=rng.poisson(2, (12, len(genes))).astype(np.float32), obsm={"spatial": rng.uniform(0, 99, (12, 2))},
               var={"gene": genes}).write_h5ad(tmp_path / "cells.h5ad")
    line = one_line(["embed", str(tmp_path / "cells.h5ad"), "--model", str(out), "--out",
                     str(tmp_path / "e.h5ad")], "pytorch_model.bin", "pickled", "system", program="stofm")
    assert "weights_only" not in line and not (tmp_path / "PWNED").exists() and not (tmp_path / "e.h5ad").exists()


# ------------------------------------------------------------------------------------- ablation --from-rows
ROWS = "method,arm,seed,seconds,recall@1\nspot image,spot,0,3.5,0.2\nneighbour average,baseline,0,,0.1\n"


@pytest.mark.parametrize(("content", "needle"), [
    (None, "does not exist"), (b"", "empty file"), (b"method,arm,seed\n", "no rows"),
    (ROWS.encode() + b"spot image,spot,1,2.0,0.3,9,9\n", "not an ablation rows CSV"),
    (bytes(range(256)) * 8, "not an"), (b"method,arm,r\nspot image,spot,0.2\n", "no column ['seed']"),
    (b"method,arm,seed\nspot image,spot,\n", "seed (empty) in line 2 is not a whole number"),
    (b"method,arm,seed\nspot image,spot,one\n", "seed 'one' in line 2"),
    (ROWS.encode() + b"spot image,spot,0,1.0,0.4\n", "rows appear twice")])
def test_ablation_rows_that_cannot_be_summarised_are_one_error_naming_the_file(tmp_path, content, needle):
    from stalign.lab.ablation import AblationError
    from stalign.lab.ablation_rows import read_rows

    path = tmp_path / "rows.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AblationError, match=r"rows\.csv") as err:
        read_rows([path])
    assert needle in str(err.value)


def test_ablation_script_from_rows_of_an_empty_file_is_one_line(tmp_path, subprocess_env):
    import subprocess
    import sys

    (tmp_path / "rows.csv").write_bytes(b"")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "ablation.py"),
                           "--from-rows", str(tmp_path / "rows.csv"), "--no-record"], capture_output=True, text=True,
                          env=subprocess_env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'rows.csv'}: empty file (no ablation rows)"


# ------------------------------------------------------------------------------------------ a full disk
def test_a_full_disk_while_writing_a_result_is_one_error_naming_the_folder(tmp_path):
    import errno

    from stofm.util.errors import SetupError
    from stofm.util.output_paths import atomic_write_path

    with pytest.raises(SetupError, match=f"cannot write pred.h5ad in {tmp_path}: the disk is full"):
        with atomic_write_path(tmp_path / "pred.h5ad") as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_last_good_checkpoint(tmp_path, one_line,
                                                                                       predict_setup, monkeypatch):
    import accelerate

    real, calls = accelerate.Accelerator.save_state, []

    def save_state(self, output_dir=None, **kw):  # the second checkpoint runs out of space half-way
        calls.append(output_dir)
        real(self, output_dir, **kw)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    run = tmp_path / "run"
    line = one_line(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml"),
                     f"data={predict_setup['shards']}", f"output_dir={run}", "max_steps=3", "save_every=1",
                     "eval_every=0"], f"cannot write checkpoint step_2 in {run / 'checkpoints'}: the disk is full",
                    f"the last good checkpoint is {run / 'checkpoints' / 'step_1'}")
    assert "enforce fail" not in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]  # the half-written one removed


# ------------------------------------------------------------------------------------------------ stofm embed
@pytest.mark.parametrize(("value", "shown"), [(np.nan, "nan"), (-1.0, "-1.0"), (np.inf, "inf"), (None, "")])
def test_stofm_embed_names_the_file_cell_and_gene_of_a_bad_count(tmp_path, one_line, value, shown):
    import anndata as ad

    rng = np.random.default_rng(0)
    x = rng.poisson(2, (30, 12)).astype(np.float32)
    n = 0 if value is None else 30
    if value is not None:
        x[3, 4] = value
    a = ad.AnnData(X=x[:n], obsm={"spatial": rng.uniform(0, 500, (n, 2))})
    a.obs_names, a.var_names = [f"c{i}" for i in range(n)], [f"G{j}" for j in range(12)]
    a.write_h5ad(tmp_path / "cells.h5ad")
    needles = ("no cells",) if value is None else (f"{shown} for cell 'c3', gene 'G4'", "1 NaN, infinite or negative")
    one_line(["embed", str(tmp_path / "cells.h5ad"), "--model", "stofm-tiny", "--out", str(tmp_path / "e.h5ad")],
             f"{tmp_path / 'cells.h5ad'}: ", *needles, program="stofm")
    assert not (tmp_path / "e.h5ad").exists()


def test_push_without_a_network_says_the_hub_cannot_be_reached(tmp_path, one_line, predict_setup, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    line = one_line(["push", str(predict_setup["ckpt"]), "--repo", "org/name"], "hf-hub:org/name",
                    "could not upload", "offline or cannot reach the hub")
    assert "download" not in line and "HF_HUB_OFFLINE=1" not in line


# ----------------------------------------------------------------------------- outputs checked before the work
@pytest.mark.parametrize(("out", "needle"), [("/proc/p.h5ad", "cannot write into /proc"),
                                             ("FILE/p.h5ad", "(not a folder)"), ("DIR.h5ad", "is a folder")])
def test_predict_refuses_an_unwritable_out_before_embedding(tmp_path, one_line, predict_setup, monkeypatch, out,
                                                            needle):
    import stalign.tasks.predict as predict

    (tmp_path / "FILE").write_text("x")
    (tmp_path / "DIR.h5ad").mkdir()
    monkeypatch.setattr(predict, "predict_slide", lambda *a, **k: pytest.fail("embedded before checking --out"))
    out = out if out.startswith("/") else str(tmp_path / out)
    one_line(["predict", "--model", str(predict_setup["ckpt"]), "--h5ad", str(predict_setup["h5ad"]),
              "--image", str(predict_setup["image"]), "--reference", str(predict_setup["shards"]), "--out", out,
              "--quiet"], needle)


def test_banks_and_checkpoints_are_replaced_whole_or_not_at_all(tmp_path, predict_setup, monkeypatch):
    import errno

    import safetensors.numpy
    import safetensors.torch

    import stalign
    from stalign.models.factory import save_checkpoint
    from stalign.tasks.retrieval import ReferenceBank
    from stofm.util.errors import SetupError

    rng = np.random.default_rng(0)
    bank = ReferenceBank(embeddings=rng.normal(size=(6, 4)), expression=rng.uniform(size=(6, 3)), genes=list("abc"))
    bank.save(tmp_path / "bank")
    ckpt = save_checkpoint(predict_setup["model"], tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in [*(tmp_path / "bank").iterdir(), *ckpt.iterdir()]}

    def full_disk(_tensors, filename, *args, **kwargs):  # half the file, then no space left
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    monkeypatch.setattr(safetensors.torch, "save_model", full_disk)
    with pytest.raises(SetupError, match=f"bank.safetensors in {tmp_path / 'bank'}: the disk is full"):
        ReferenceBank(embeddings=rng.normal(size=(2, 4)), expression=np.ones((2, 3)), genes=list("abc")).save(
            tmp_path / "bank")
    with pytest.raises(SetupError, match="model.safetensors .* the disk is full"):
        save_checkpoint(stalign.create_model("stalign-tiny", n_genes=3), ckpt)
    after = {p.name: p.read_bytes() for p in [*(tmp_path / "bank").iterdir(), *ckpt.iterdir()]}
    assert after == before  # the old files, whole, and no temporary left
    assert len(ReferenceBank.load(tmp_path / "bank")) == 6 and stalign.load_checkpoint(ckpt).genes == \
        predict_setup["model"].genes


def test_a_prediction_records_the_absolute_slide_path_for_heatmaps_from_another_folder(tmp_path, predict_setup,
                                                                                       monkeypatch):
    import anndata as ad

    from stalign.cli import main

    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    other.mkdir()
    shutil.copy(predict_setup["image"], work / "slide.jpg")
    shutil.copy(predict_setup["h5ad"], work / "spots.h5ad")
    monkeypatch.chdir(work)
    assert main(["predict", "--model", str(predict_setup["ckpt"]), "--h5ad", "spots.h5ad", "--image", "slide.jpg",
                 "--reference", str(predict_setup["shards"]), "--out", "pred.h5ad", "--heatmap-genes", "none",
                 "--quiet"]) == 0
    assert ad.read_h5ad(work / "pred.h5ad").uns["stalign"]["slide"] == str(work / "slide.jpg")
    monkeypatch.chdir(other)
    gene = predict_setup["manifest"]["genes"][0]
    assert main(["heatmaps", str(work / "pred.h5ad"), "--genes", gene, "--out", "maps"]) == 0
    assert (other / "maps" / f"{gene}.png").is_file()


@pytest.mark.parametrize(("flag", "content", "needle"), [
    ("--genes", None, "1 of 1 query genes are not in the model's panel"),
    ("--expression", "geneA,1.0\n", "--expression"), ("--expression", "\x00\x01binary,x\n", "not a CSV of gene,value"),
    ("--expression", "", "no finite value for 20 of the panel")])
def test_retrieve_signature_checks_the_signature_before_embedding(tmp_path, one_line, predict_setup, monkeypatch,
                                                                  flag, content, needle):
    import stalign.tasks.embed as embed
    import stalign.tasks.predict as predict

    for module, name in ((predict, "embed_slide"), (embed, "load_reference")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("embedded before checking the signature"))
    if flag == "--genes":
        value = ["NOT_A_GENE"]
    else:
        (tmp_path / "profile.csv").write_text(content)
        value = [str(tmp_path / "profile.csv")]
    one_line(["retrieve", "signature", "--model", str(predict_setup["ckpt"]), "--reference",
              str(predict_setup["shards"]), "--h5ad", str(predict_setup["h5ad"]), "--image", str(predict_setup["image"]),
              "--out", str(tmp_path / "sig.png"), flag, *value], needle)
    assert not (tmp_path / "sig.png").exists()


@pytest.mark.parametrize(("command", "flag"), [("bench", "--latent-dim"), ("bench", "--folds"),
                                               ("fewshot", "--latent-dim")])
def test_counts_below_their_minimum_are_refused_before_any_work(tmp_path, one_line, predict_setup, monkeypatch,
                                                                command, flag):
    import stalign.tasks.bench as bench
    import stalign.tasks.embed as embed
    from stalign.tasks.hest import RidgeProbe

    monkeypatch.setattr(bench, "bench_shards", lambda *a, **k: pytest.fail("benchmarked before checking the flags"))
    monkeypatch.setattr(embed, "embed_shards", lambda *a, **k: pytest.fail("embedded before checking the flags"))
    value = "0" if flag == "--latent-dim" else "1"
    rest = (["--encoders", str(predict_setup["ckpt"]), "--out", str(tmp_path / "t.csv")] if command == "bench" else
            ["--model", str(predict_setup["ckpt"]), "--out", str(tmp_path / "head")])
    one_line([command, "--shards", str(predict_setup["shards"]), flag, value, *rest],
             f"{flag} must be >= {1 if flag == '--latent-dim' else 2}, got {value}")
    assert not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="latent_dim"):
        RidgeProbe(latent_dim=0)


def test_train_names_the_manifest_entry_without_a_shard(tmp_path, one_line, predict_setup):
    shards = shutil.copytree(predict_setup["shards"], tmp_path / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    del manifest["slides"][0]["shard"]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    one_line(["train", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "tiny_test.yaml"),
              f"data={shards}", f"output_dir={tmp_path / 'run'}"], f"{shards / 'manifest.json'}: slide entry 1",
             "lacks ['shard']")
    assert not (tmp_path / "run").exists()
