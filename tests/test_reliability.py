"""Issue 25: nothing written outside ``--out``, no input overwritten, no half-written result, no silent garbage.
File names from identifiers, outputs that are inputs, atomic writes, locks, size limits, expression dtypes, banks
tied to their model's weights and checksummed faiss indexes; each case one clear line, exit 1, no traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stofm.util.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def sha(path: Path) -> str:
    from stofm.util.safe_files import sha256_of

    return sha256_of(path)


# ------------------------------------------------------------------------------------ names that become files
@pytest.mark.parametrize("value", ["../../X", "a/b", "a\\b", "..", ".hidden", "x\x00y", "line\nbreak", "", "é" * 100])
def test_safe_name_refuses_what_is_not_one_plain_file_name(value):
    from stofm.util.output_paths import safe_name

    with pytest.raises(InputError, match="slide_id") as err:
        safe_name(value, "slide_id", source="samples.csv")
    assert "samples.csv" in str(err.value) and "\n" not in str(err.value)
    assert safe_name("Visium_FFPE-1.2", "slide_id") == "Visium_FFPE-1.2"


def test_gene_file_stems_are_distinct_and_a_repeated_gene_is_refused():
    from stofm.util.output_paths import file_stems

    stems = file_stems(["CD8/A", "CD8_A", "../etc", "X" * 400], "gene")
    assert len(set(stems)) == 4 and stems[1] == "CD8_A"
    assert all("/" not in s and not s.startswith(".") and len(s) < 200 for s in stems)
    with pytest.raises(InputError, match="'G' is given twice"):
        file_stems(["G", "G"], "gene")


def test_heatmaps_of_cd8_slash_a_and_cd8_a_are_two_files(tmp_path):
    from stalign.tasks.heatmaps import plot_gene_heatmaps

    xy = np.array([[10.0, 10.0], [30.0, 10.0], [10.0, 30.0], [30.0, 30.0]])
    paths = plot_gene_heatmaps(np.arange(8.0).reshape(4, 2), ["CD8/A", "CD8_A"], xy, tmp_path / "maps", dpi=20)
    assert len({p.name for p in paths}) == 2 and all(p.parent == tmp_path / "maps" and p.is_file() for p in paths)
    assert sorted(os.listdir(tmp_path / "maps")) == sorted(p.name for p in paths)  # no temporaries left


def test_prep_refuses_a_slide_id_that_leaves_out(tmp_path, one_line, squidpy_crop):
    table = tmp_path / "in" / "samples.csv"
    table.parent.mkdir()
    table.write_text(f"h5ad,image,slide_id\n{squidpy_crop / 'test_data.h5ad'},{squidpy_crop / 'test_img.jpg'},../../X\n")
    one_line(["prep", "--samples", str(table), "--out", str(tmp_path / "a" / "b" / "out"), "--quiet"],
             "samples.csv", "row 1 slide_id", "../../X")
    assert not list(tmp_path.rglob("X*")) and not (tmp_path / "a").exists()


def test_a_shards_manifest_cannot_send_export_outside_out(tmp_path, one_line, predict_setup):
    shards = shutil.copytree(predict_setup["shards"], tmp_path / "deep" / "er" / "shards")
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["slides"][0]
    manifest["slides"] = [entry, {**entry, "slide_id": "../../X", "shard": "shards/../../X.h5"}]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "deep" / "er" / "task"
    one_line(["data", "export-hest", str(shards), "--out", str(out)], "manifest.json", "../../X")
    assert not list(tmp_path.rglob("X*")) and not out.exists()
    manifest["slides"] = [entry, {k: v for k, v in entry.items() if k != "shard"}]
    (shards / "manifest.json").write_text(json.dumps(manifest))
    one_line(["data", "export-hest", str(shards), "--out", str(out)], "manifest.json", "shard")
    assert not out.exists()


@pytest.mark.parametrize("spec", ["hf-hub:org/name@../../..", "hf-hub:../x", "hf-hub:org/na/me", "hf-hub:org/.x"])
def test_hub_specs_cannot_leave_the_hub_cache(spec):
    import stalign

    with pytest.raises(InputError, match="hf-hub:"):
        stalign.load_checkpoint(spec)  # refused before any download


# ------------------------------------------------------------------------------- outputs that are inputs
def test_predict_refuses_an_out_that_is_its_coords(tmp_path, one_line, predict_setup):
    mine = shutil.copy(predict_setup["h5ad"], tmp_path / "mine.h5ad")
    before = sha(mine)
    one_line(["predict", "--model", str(predict_setup["ckpt"]), "--slide", str(predict_setup["image"]),
              "--um-per-px", "0.6149", "--coords", str(mine), "--reference", str(predict_setup["shards"]),
              "--out", str(tmp_path / "." / "mine.h5ad")], "--out", "--coords", "mine.h5ad")
    assert sha(mine) == before


def test_domains_refuses_to_write_its_labels_over_its_input(tmp_path, one_line, predict_setup):
    mine = shutil.copy(predict_setup["h5ad"], tmp_path / "P.h5ad")
    before = sha(mine)
    one_line(["domains", "--h5ad", str(mine), "--obsm", "spatial", "--out", str(tmp_path / "P.png")],
             "--h5ad", "P.h5ad")
    assert sha(mine) == before and not (tmp_path / "P.png").exists()


# ----------------------------------------------------------------------------------------- atomic writes
def test_atomic_write_path_publishes_whole_results_only(tmp_path):
    from stofm.util.output_paths import atomic_write_path

    final = tmp_path / "sub" / "pred.h5ad"
    with atomic_write_path(final) as tmp:
        assert tmp.parent == final.parent and tmp.suffix == ".h5ad" and tmp.name.startswith(".pred.h5ad.")
        tmp.write_text("first")
    assert final.read_text() == "first"
    with pytest.raises(RuntimeError), atomic_write_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert final.read_text() == "first" and os.listdir(final.parent) == ["pred.h5ad"]


def test_kill_9_while_writing_leaves_no_file_under_the_final_name(tmp_path):
    from stofm.util.output_paths import atomic_write_path

    final = tmp_path / "pred.h5ad"
    code = ("import os, signal, sys; from stofm.util.output_paths import atomic_write_path\n"
            f"with atomic_write_path({str(final)!r}) as tmp:\n"
            "    tmp.write_bytes(b'half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -9 and not final.exists()
    (left,) = os.listdir(tmp_path)
    assert left.startswith(".pred.h5ad.")
    with atomic_write_path(final) as tmp:  # the next writer removes the dead one's temporary
        tmp.write_text("whole")
    assert os.listdir(tmp_path) == ["pred.h5ad"]


# ------------------------------------------------------------------------------------------------- locks
def test_a_second_predict_to_the_same_out_is_refused(tmp_path, one_line, predict_setup):
    from stofm.util.output_paths import take_lock

    out = tmp_path / "pred.h5ad"
    held = take_lock(tmp_path / ".pred.h5ad.lock", holder="test")
    try:
        one_line(["predict", "--model", str(predict_setup["ckpt"]), "--slide", str(predict_setup["image"]),
                  "--um-per-px", "0.6149", "--reference", str(predict_setup["shards"]), "--out", str(out)],
                 "another stalign predict is writing", "pred.h5ad")
    finally:
        held.release()
    assert not out.exists()


def test_a_second_training_into_one_output_dir_is_refused(tmp_path, one_line, predict_setup):
    run = tmp_path / "run"
    code = ("import sys; from stofm.util.output_paths import take_lock\n"
            f"lock = take_lock({str(run / '.train.lock')!r}, holder='first'); print('held', flush=True)\n"
            "sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line(["train", "--config", str(REPO / "configs" / "tiny_test.yaml"),
                  f"data={predict_setup['shards']}", f"output_dir={run}", "max_steps=1"],
                 "another training is writing into", str(run))
        assert sorted(os.listdir(run)) == [".train.lock"]  # no log, config or checkpoint of the second run
    finally:
        holder.communicate("\n", timeout=30)


# ------------------------------------------------------------------------------------------ size limits
def test_crop_sizes_are_bounded_with_the_limit_named_and_a_variable_to_raise_it(monkeypatch):
    from stalign.data.crop_spec import CropSpec
    from stofm.util.limits import LimitError

    with pytest.raises(LimitError, match="patch_px 100000 is 100,000, above the limit of 4,096.*STALIGN_MAX_PATCH_PX"):
        CropSpec(patch_px=100_000)
    with pytest.raises(LimitError, match="crop width 1e\\+07 µm.*STALIGN_MAX_CROP_UM"):
        CropSpec(spot_um=1e7, niche_um=1e7)
    with pytest.raises(LimitError, match="STALIGN_MAX_CROP_READ_PX"):
        CropSpec().pixels(0.001)  # 336 µm at 0.001 µm/px: a 336,000-px read
    monkeypatch.setenv("STALIGN_MAX_PATCH_PX", "200000")
    assert CropSpec(patch_px=100_000).patch_px == 100_000
    monkeypatch.setenv("STALIGN_MAX_PATCH_PX", "lots")
    with pytest.raises(InputError, match="STALIGN_MAX_PATCH_PX='lots'"):
        CropSpec()


def test_prep_patch_px_100000_is_one_line(tmp_path, one_line, squidpy_crop):
    one_line(["prep", "--h5ad", str(squidpy_crop / "test_data.h5ad"), "--image",
              str(squidpy_crop / "test_img.jpg"), "--out", str(tmp_path / "out"), "--patch-px", "100000"],
             "100,000", "STALIGN_MAX_PATCH_PX")
    assert not (tmp_path / "out").exists()


def test_plain_image_pixels_are_bounded_by_a_variable(tmp_path, monkeypatch, squidpy_crop):
    from stalign.data.errors import SlideError
    from stalign.data.slide import open_slide

    monkeypatch.setenv("STALIGN_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(SlideError, match="test_img.jpg.*STALIGN_MAX_IMAGE_PIXELS"):
        open_slide(squidpy_crop / "test_img.jpg", um_per_px=0.6149)


@pytest.mark.parametrize(("step", "needles"), [("0.01", ("STALIGN_MAX_TILES", "grid")), ("0", ("--step-um",))])
def test_predict_tile_grids_are_bounded_and_a_zero_step_refused(tmp_path, one_line, predict_setup, step, needles):
    one_line(["predict", "--model", str(predict_setup["ckpt"]), "--slide", str(predict_setup["image"]),
              "--um-per-px", "0.6149", "--reference", str(predict_setup["shards"]), "--step-um", step,
              "--out", str(tmp_path / "pred.h5ad"), "--quiet"], *needles)
    assert not (tmp_path / "pred.h5ad").exists()


# ------------------------------------------------------------------------------------- expression dtypes
def test_expression_beyond_float16_is_stored_as_float32_and_non_finite_refused(tmp_path):
    from stalign.data.shards import ShardError, ShardWriter, read_shard

    def write(expr, name):
        n = len(expr)
        with ShardWriter(tmp_path / f"{name}.h5", slide_id=name, n_spots=n, patch_px=4, genes=["a", "b"],
                         um_per_px=1.0) as w:
            w.write_patches(0, np.zeros((n, 4, 4, 3), np.uint8), np.zeros((n, 4, 4, 3), np.uint8))
            return w.finish(expr=expr, niche_expr=expr, coords_px=np.zeros((n, 2)), coords_um=np.zeros((n, 2)),
                            neighbors=np.zeros((n, 1), int), padded=np.zeros(n, bool), barcodes=["x", "y"])

    import h5py

    cpm = np.array([[79_697.0, 1.5], [1e30, 0.0]])
    got = read_shard(write(cpm, "cpm"))["expr"]
    np.testing.assert_allclose(got, cpm.astype(np.float32), rtol=1e-6)
    with h5py.File(tmp_path / "cpm.h5") as f:
        assert f["expr"].dtype == np.float32
    with h5py.File(write(np.array([[9.2, 0.0], [1.0, 2.0]]), "logn")) as f:
        assert f["expr"].dtype == np.float16  # log-normalised values keep the compact dtype
    with pytest.raises(ShardError, match="slide bad: expr holds 1 NaN/inf values"):
        write(np.array([[np.inf, 0.0], [1.0, 2.0]]), "bad")
    assert not (tmp_path / "bad.h5").exists()


# ------------------------------------------------------------------------------- banks and faiss indexes
def test_a_bank_of_another_model_is_refused(tmp_path, predict_setup):
    import torch

    import stalign
    from stalign.models.factory import save_checkpoint
    from stalign.tasks.embed import bank_from_shards, load_reference

    model = predict_setup["model"]
    bank = bank_from_shards(model, predict_setup["shards"], progress=False)
    assert bank.info["model_weights_sha256"] == model.meta["weights_sha256"]
    folder = bank.save(tmp_path / "bank")
    assert load_reference(folder, model).info["model_weights_sha256"] == model.meta["weights_sha256"]
    torch.manual_seed(1)
    other = stalign.load_checkpoint(save_checkpoint(
        stalign.create_model("stalign-tiny", genes=list(model.genes)), tmp_path / "other"))
    with pytest.raises(InputError, match="bank.*embedded by model.*not this model's"):
        load_reference(folder, other)


def test_every_faiss_index_kind_is_checksummed(tmp_path):
    pytest.importorskip("faiss")
    from stalign.tasks.ann_index import IndexMismatchError, build_index, index_files, load_index, save_index

    emb = np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)
    for kind, params in (("hnsw", {"M": 8, "ef_construction": 16, "ef_search": 16}), ("ivf", {"nlist": 4})):
        ann = build_index(emb, kind, params)
        path = save_index(ann, tmp_path, bank_sha256="b" * 64, n_rows=len(emb))
        assert load_index(tmp_path, kind, ann.params, bank_sha256="b" * 64, n_rows=len(emb)) is not None
        data = bytearray(path.read_bytes())
        data[-64:-32] = bytes(32)  # the stored vectors overwritten: faiss itself reads them without complaint
        path.write_bytes(bytes(data))
        with pytest.raises(IndexMismatchError, match="damaged"):
            load_index(tmp_path, kind, ann.params, bank_sha256="b" * 64, n_rows=len(emb))
        assert index_files(tmp_path, kind, ann.params)[0] == path


def test_prep_keeps_expression_given_above_float16_range(tmp_path, squidpy_crop):
    import anndata as ad

    from stalign.cli import main
    from stalign.data.shards import read_manifest, read_shard

    a = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.asarray(a.X)
    a.X = x * 100_000.5 + 0.25  # non-integer values given as they are (e.g. CPM), well above float16's 65,504
    a.write_h5ad(tmp_path / "cpm.h5ad")
    assert main(["prep", "--h5ad", str(tmp_path / "cpm.h5ad"), "--image", str(squidpy_crop / "test_img.jpg"),
                 "--out", str(tmp_path / "out"), "--patch-px", "8", "--n-top-genes", "5", "--quiet"]) == 0
    m = read_manifest(tmp_path / "out")
    expr = read_shard(tmp_path / "out" / m["slides"][0]["shard"])["expr"]
    assert m["expression"] == "as_given" and np.isfinite(expr).all() and expr.max() > 65_504
    np.testing.assert_allclose(np.sort(expr.ravel())[-5:], np.sort((x * 100_000.5 + 0.25)[:, [
        list(a.var_names).index(g) for g in m["genes"]]].ravel())[-5:], rtol=1e-6)


def test_stofm_embed_into_the_folder_of_its_inputs_is_refused(tmp_path, one_line, squidpy_crop):
    a = shutil.copy(squidpy_crop / "test_data.h5ad", tmp_path / "a.h5ad")
    b = shutil.copy(squidpy_crop / "test_data.h5ad", tmp_path / "b.h5ad")
    before = sha(Path(a))
    one_line(["embed", str(a), str(b), "--model", "stofm-tiny", "--out", str(tmp_path)],
             "a.h5ad", "same file as the input", program="stofm")
    assert sha(Path(a)) == before and sorted(os.listdir(tmp_path)) == ["a.h5ad", "b.h5ad"]
