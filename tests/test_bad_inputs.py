"""Bad-input suite: every command given broken inputs (missing, zero-byte, truncated or garbage files of each format it
reads; NaN/inf/negative values; duplicates; missing keys; out-of-range numbers; mismatched panels; unopenable
slides). Each case must end with a non-zero exit, ONE line on stderr that names the file (or the value) and the
problem, no traceback, and nothing written at the output location."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny_test.yaml")


# ------------------------------------------------------------------------------------------------ file makers
def zero(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def garbage(path: Path, n: int = 4096) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(n))
    return path


def truncated(src: Path, dest: Path) -> Path:
    data = src.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def copy_tree(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def crop_h5ad(ctx, path: Path, edit: Callable[[object], object]) -> Path:
    import anndata as ad

    a = ad.read_h5ad(ctx.h5ad)
    res = edit(a)
    (res if isinstance(res, ad.AnnData) else a).write_h5ad(path)
    return path


def set_x(a, fn):
    x = a.X.toarray() if hasattr(a.X, "toarray") else np.array(a.X)
    fn(x)
    a.X = x
    return a


@pytest.fixture(scope="module")
def ctx(tmp_path_factory, squidpy_crop, small_shards):
    """Good inputs of every kind, made once: shards, a checkpoint, a reference bank, a few-shot head."""
    import torch

    import stalign
    from stalign.cli import main
    from stalign.data.shards import read_manifest
    from stalign.models.factory import save_checkpoint

    root = tmp_path_factory.mktemp("good")
    shards = small_shards("squidpy")
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=read_manifest(shards)["genes"])
    ckpt = save_checkpoint(model, root / "ckpt")
    assert main(["retrieve", "bank", "--model", str(ckpt), "--shards", str(shards), "--out", str(root / "bank"),
                 "--quiet"]) == 0
    assert main(["fewshot", "--model", str(ckpt), "--shards", str(shards), "--out", str(root / "head"),
                 "--kind", "ridge", "--quiet"]) == 0
    return SimpleNamespace(h5ad=squidpy_crop / "test_data.h5ad", image=squidpy_crop / "test_img.jpg", shards=shards,
                           ckpt=ckpt, bank=root / "bank", head=root / "head", genes=read_manifest(shards)["genes"])


def prep(ctx, t, *args):
    return ["prep", *args, "--out", str(t / "out"), "--patch-px", "32", "--quiet"], t / "out"


def prep_pair(ctx, t, h5ad, image, *args):
    return prep(ctx, t, "--h5ad", str(h5ad), "--image", str(image), *args)


def train(ctx, t, *args, data=None):
    return ["train", "--config", TINY, f"data={data or ctx.shards}", f"output_dir={t / 'run'}", *args], t / "run"


def predict(ctx, t, *args, model=None, slide=None, reference=None):
    argv = ["predict", "--model", str(model or ctx.ckpt), "--slide", str(slide or ctx.image), "--um-per-px", "0.6149",
            "--reference", str(reference or ctx.bank), "--out", str(t / "pred.h5ad"), "--quiet", *args]
    return argv, t / "pred.h5ad"


def fake_spaceranger(ctx, t, fetched, edit: Callable[[Path], None]) -> Path:
    folder = copy_tree(fetched("squidpy-spaceranger"), t / "sr")
    edit(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- the cases
# name -> builder(ctx, tmp, fetched) -> (program, argv, substrings the one error line must contain, output path)
CASES: dict[str, Callable] = {
    # prep: AnnData + image
    "prep h5ad missing": lambda c, t, f: ("stalign", *prep_pair(c, t, t / "no.h5ad", c.image), ["no.h5ad"]),
    "prep h5ad zero-byte": lambda c, t, f: ("stalign", *prep_pair(c, t, zero(t / "z.h5ad"), c.image), ["z.h5ad"]),
    "prep h5ad garbage": lambda c, t, f: ("stalign", *prep_pair(c, t, garbage(t / "g.h5ad"), c.image), ["g.h5ad"]),
    "prep h5ad truncated": lambda c, t, f: ("stalign", *prep_pair(c, t, truncated(c.h5ad, t / "t.h5ad"), c.image),
                                            ["t.h5ad"]),
    "prep image missing": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, t / "no.jpg"), ["no.jpg"]),
    "prep image garbage": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, garbage(t / "g.jpg")), ["g.jpg"]),
    "prep image zero-byte": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, zero(t / "z.tif")), ["z.tif"]),
    "prep image truncated": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, truncated(c.image, t / "t.jpg")),
                                             ["t.jpg"]),
    "prep no spatial": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "ns.h5ad", lambda a: a.obsm.pop("spatial")), c.image), ["ns.h5ad", "spatial"]),
    "prep NaN coordinates": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "nan.h5ad", lambda a: a.obsm.__setitem__("spatial", np.where(
        np.arange(a.n_obs)[:, None] == 0, np.nan, a.obsm["spatial"].astype(float)))), c.image),
        ["nan.h5ad"]),
    "prep inf expression": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "inf.h5ad", lambda a: set_x(a, lambda x: x.__setitem__((0, 0), np.inf))), c.image),
        ["inf.h5ad"]),
    "prep negative counts": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "neg.h5ad", lambda a: set_x(a, lambda x: x.__setitem__((1, 1), -3))), c.image),
        ["neg.h5ad"]),
    "prep duplicate barcodes": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "dupb.h5ad", lambda a: setattr(a, "obs_names", [a.obs_names[0]] * a.n_obs)), c.image),
        ["dupb.h5ad"]),
    "prep duplicate genes": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "dupg.h5ad", lambda a: setattr(a, "var_names", [a.var_names[0]] * 2 +
                                                               list(a.var_names[2:]))), c.image),
        ["dupg.h5ad", "--make-unique-genes"]),
    "prep empty AnnData": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "empty.h5ad", lambda a: a[:0].copy()), c.image), ["empty.h5ad"]),
    "prep gene file missing": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, c.image, "--genes",
                                                                       str(t / "genes.txt")), ["genes.txt"]),
    "prep gene file empty": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, c.image, "--genes",
                                                                     str(zero(t / "g.txt"))), ["g.txt"]),
    "prep genes not in data": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, c.image, "--genes", str(
        _write(t / "panel.txt", "NotAGene1\nNotAGene2\n"))), ["NotAGene1"]),
    "prep samples YAML malformed": lambda c, t, f: ("stalign", *prep(c, t, "--samples", str(
        _write(t / "s.yaml", "slides: [h5ad: {\n"))), ["s.yaml"]),
    "prep samples CSV missing columns": lambda c, t, f: ("stalign", *prep(c, t, "--samples", str(
        _write(t / "s.csv", "name,path\na,b\n"))), ["s.csv"]),
    "prep samples YAML not a list": lambda c, t, f: ("stalign", *prep(c, t, "--samples", str(
        _write(t / "s.yaml", "42\n"))), ["s.yaml"]),
    "prep samples file missing": lambda c, t, f: ("stalign", *prep(c, t, "--samples", str(t / "none.csv")),
                                                  ["none.csv"]),
    "prep unpaired image": lambda c, t, f: ("stalign", *prep(c, t, "--h5ad", str(c.h5ad)), ["--image"]),
    "prep negative pixel size": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, c.image, "--um-per-px", "-1"),
                                                 ["-1"]),
    "prep zero spot size": lambda c, t, f: ("stalign", *prep_pair(c, t, c.h5ad, c.image, "--spot-um", "0"),
                                            ["spot_um"]),
    "prep no pixel size anywhere": lambda c, t, f: ("stalign", *prep_pair(
        c, t, crop_h5ad(c, t / "nopx.h5ad", lambda a: a.uns.pop("spatial")), c.image), ["nopx.h5ad", "--um-per-px"]),
    # prep: Space Ranger and HEST folders
    "prep spaceranger missing": lambda c, t, f: ("stalign", *prep(c, t, "--spaceranger", str(t / "nowhere")),
                                                 ["nowhere"]),
    "prep spaceranger empty folder": lambda c, t, f: ("stalign", *prep(c, t, "--spaceranger", str(
        _mkdir(t / "srempty"))), ["srempty"]),
    "prep spaceranger bad scalefactors": lambda c, t, f: ("stalign", *prep(c, t, "--spaceranger", str(
        fake_spaceranger(c, t, f, lambda d: _write(d / "spatial" / "scalefactors_json.json", "{oops")))),
        ["scalefactors_json.json"]),
    "prep spaceranger garbage matrix": lambda c, t, f: ("stalign", *prep(c, t, "--spaceranger", str(
        fake_spaceranger(c, t, f, lambda d: garbage(d / "filtered_feature_bc_matrix.h5")))),
        ["filtered_feature_bc_matrix.h5"]),
    "prep spaceranger garbage positions": lambda c, t, f: ("stalign", *prep(c, t, "--spaceranger", str(
        fake_spaceranger(c, t, f, lambda d: _write(d / "spatial" / "tissue_positions_list.csv", "x\n1\n")))),
        ["tissue_positions_list.csv"]),
    "prep hest root without st": lambda c, t, f: ("stalign", *prep(c, t, "--hest", str(_mkdir(t / "hest"))),
                                                  ["hest"]),
    # train
    "train config missing": lambda c, t, f: ("stalign", ["train", "--config", str(t / "no.yaml")], t / "run",
                                             ["no.yaml"]),
    "train config malformed": lambda c, t, f: ("stalign", ["train", "--config", str(_write(t / "bad.yaml",
                                               "model: [stalign-tiny\n"))], t / "run", ["bad.yaml"]),
    "train config not a mapping": lambda c, t, f: ("stalign", ["train", "--config", str(_write(t / "l.yaml",
                                                   "- a\n- b\n"))], t / "run", ["l.yaml"]),
    "train config zero-byte garbage": lambda c, t, f: ("stalign", ["train", "--config", str(garbage(t / "g.yaml"))],
                                                       t / "run", ["g.yaml"]),
    "train unknown key": lambda c, t, f: ("stalign", *train(c, t, "learning_rate=0.1"), ["learning_rate"]),
    "train data missing": lambda c, t, f: ("stalign", *train(c, t, data=t / "noshards"), ["noshards"]),
    "train manifest garbage": lambda c, t, f: ("stalign", *train(c, t, data=_shards_with(
        c, t, lambda d: garbage(d / "manifest.json"))), ["manifest.json"]),
    "train shard missing": lambda c, t, f: ("stalign", *train(c, t, data=_shards_with(
        c, t, lambda d: [p.unlink() for p in (d / "shards").glob("*.h5")])), ["test_data.h5"]),
    "train shard garbage": lambda c, t, f: ("stalign", *train(c, t, data=_shards_with(
        c, t, lambda d: [garbage(p) for p in (d / "shards").glob("*.h5")])), ["test_data.h5"]),
    "train negative lr": lambda c, t, f: ("stalign", *train(c, t, "lr=-1"), ["lr"]),
    "train zero batch": lambda c, t, f: ("stalign", *train(c, t, "batch_size=0"), ["batch_size"]),
    "train resume without checkpoint": lambda c, t, f: ("stalign", *train(c, t, "--resume"), ["no complete checkpoint"]),
    "train init missing": lambda c, t, f: ("stalign", *train(c, t, f"init={t / 'noinit'}"), ["noinit"]),
    # predict
    "predict model missing": lambda c, t, f: ("stalign", *predict(c, t, model=t / "nomodel"), ["nomodel"]),
    "predict model config garbage": lambda c, t, f: ("stalign", *predict(c, t, model=_ckpt_with(
        c, t, lambda d: _write(d / "config.json", "{not json"))), ["config.json"]),
    "predict weights truncated": lambda c, t, f: ("stalign", *predict(c, t, model=_ckpt_with(
        c, t, lambda d: truncated(d / "model.safetensors", d / "model.safetensors"))), ["model.safetensors"]),
    "predict weights random bytes": lambda c, t, f: ("stalign", *predict(c, t, model=_ckpt_with(c, t, _scribble)),
                                                     ["model.safetensors"]),
    "predict weights zero-byte": lambda c, t, f: ("stalign", *predict(c, t, model=_ckpt_with(
        c, t, lambda d: zero(d / "model.safetensors"))), ["model.safetensors"]),
    "predict slide missing": lambda c, t, f: ("stalign", *predict(c, t, slide=t / "no.svs"), ["no.svs"]),
    "predict slide garbage": lambda c, t, f: ("stalign", *predict(c, t, slide=garbage(t / "g.svs")), ["g.svs"]),
    "predict coords missing": lambda c, t, f: ("stalign", *predict(c, t, "--coords", str(t / "c.csv")), ["c.csv"]),
    "predict coords without x,y": lambda c, t, f: ("stalign", *predict(c, t, "--coords", str(
        _write(t / "c.csv", "a,b\n1,2\n"))), ["c.csv"]),
    "predict coords garbage h5ad": lambda c, t, f: ("stalign", *predict(c, t, "--coords", str(
        garbage(t / "c.h5ad"))), ["c.h5ad"]),
    "predict coords NaN": lambda c, t, f: ("stalign", *predict(c, t, "--coords", str(
        _write(t / "c.csv", "x,y\n1,nan\n"))), ["NaN"]),
    "predict bank json garbage": lambda c, t, f: ("stalign", *predict(c, t, reference=_bank_with(
        c, t, lambda d: _write(d / "bank.json", "[1,"))), ["bank.json"]),
    "predict bank truncated": lambda c, t, f: ("stalign", *predict(c, t, reference=_bank_with(
        c, t, lambda d: truncated(d / "bank.safetensors", d / "bank.safetensors"))), ["bank.safetensors"]),
    "predict reference missing": lambda c, t, f: ("stalign", *predict(c, t, reference=t / "noref"), ["noref"]),
    "predict head truncated": lambda c, t, f: ("stalign", *predict(c, t, "--fewshot-head", str(_head_with(
        c, t, lambda d: truncated(d / "head.safetensors", d / "head.safetensors")))), ["head.safetensors"]),
    "predict unknown heatmap gene": lambda c, t, f: ("stalign", *predict(c, t, "--heatmap-genes", "NotAGene"),
                                                     ["NotAGene"]),
    "predict unknown gene": lambda c, t, f: ("stalign", *predict(c, t, "--genes", "NotAGene"), ["NotAGene"]),
    "predict out not h5ad": lambda c, t, f: ("stalign", [a if a != str(t / "pred.h5ad") else str(t / "p.csv")
                                                         for a in predict(c, t)[0]], t / "p.csv", ["p.csv"]),
    "predict k zero": lambda c, t, f: ("stalign", *predict(c, t, "--k", "0"), ["--k"]),
    # retrieve, bench, fewshot
    "retrieve bank shards missing": lambda c, t, f: ("stalign", ["retrieve", "bank", "--model", str(c.ckpt),
                                                     "--shards", str(t / "nos"), "--out", str(t / "b")], t / "b",
                                                    ["nos"]),
    "retrieve bank model garbage": lambda c, t, f: ("stalign", ["retrieve", "bank", "--model", str(_ckpt_with(
        c, t, lambda d: garbage(d / "model.safetensors"))), "--shards", str(c.shards), "--out", str(t / "b")],
        t / "b", ["model.safetensors"]),
    "retrieve signature bank garbage": lambda c, t, f: ("stalign", ["retrieve", "signature", "--model", str(c.ckpt),
                                                        "--reference", str(_bank_with(c, t, lambda d: garbage(
                                                            d / "bank.safetensors"))), "--slide", str(c.image),
                                                        "--um-per-px", "0.6", "--genes", c.genes[0], "--out",
                                                        str(t / "s.h5ad"), "--quiet"], t / "s.h5ad",
                                                       ["bank.safetensors"]),
    "bench shards missing": lambda c, t, f: ("stalign", ["bench", "--shards", str(t / "nos"), "--encoders",
                                             "timm:resnet18", "--out", str(t / "b.csv")], t / "b.csv", ["nos"]),
    "bench unknown encoder": lambda c, t, f: ("stalign", ["bench", "--shards", str(c.shards), "--encoders",
                                              "no-such-encoder", "--by", "spot", "--out", str(t / "b.csv"), "--quiet"], t / "b.csv",
                                             ["no-such-encoder"]),
    "bench model checkpoint garbage": lambda c, t, f: ("stalign", ["bench", "--shards", str(c.shards), "--by", "spot",
                                                       "--encoders", f"model:{_ckpt_with(c, t, _scribble)}", "--out",
                                                       str(t / "b.csv"), "--quiet"], t / "b.csv",
                                                      ["model.safetensors"]),
    "fewshot labels missing": lambda c, t, f: ("stalign", ["fewshot", "--model", str(c.ckpt), "--shards",
                                               str(c.shards), "--kind", "logistic", "--labels", str(t / "l.csv"),
                                               "--out", str(t / "h")], t / "h", ["l.csv"]),
    "fewshot labels unknown barcodes": lambda c, t, f: ("stalign", ["fewshot", "--model", str(c.ckpt), "--shards",
                                                        str(c.shards), "--kind", "logistic", "--labels", str(_write(
                                                            t / "l.csv", "barcode,label\nXX-1,a\nYY-1,b\n")),
                                                        "--out", str(t / "h")], t / "h", ["l.csv"]),
    "fewshot model truncated": lambda c, t, f: ("stalign", ["fewshot", "--model", str(_ckpt_with(
        c, t, lambda d: truncated(d / "model.safetensors", d / "model.safetensors"))), "--shards", str(c.shards),
        "--out", str(t / "h"), "--quiet"], t / "h", ["model.safetensors"]),
    # stofm embed
    "stofm embed garbage h5ad": lambda c, t, f: ("stofm", ["embed", str(garbage(t / "g.h5ad")), "--model",
                                                 "stofm-tiny", "--out", str(t / "e.h5ad")], t / "e.h5ad", ["g.h5ad"]),
    "stofm embed zero-byte h5ad": lambda c, t, f: ("stofm", ["embed", str(zero(t / "z.h5ad")), "--model",
                                                   "stofm-tiny", "--out", str(t / "e.h5ad")], t / "e.h5ad", ["z.h5ad"]),
    "stofm embed missing input": lambda c, t, f: ("stofm", ["embed", str(t / "no.h5ad"), "--model", "stofm-tiny",
                                                  "--out", str(t / "e.h5ad")], t / "e.h5ad", ["no.h5ad"]),
    "stofm embed unknown model": lambda c, t, f: ("stofm", ["embed", str(c.h5ad), "--model", "stofm-huge", "--out",
                                                  str(t / "e.h5ad")], t / "e.h5ad", ["stofm-huge"]),
    "stofm embed model folder garbage": lambda c, t, f: ("stofm", ["embed", str(c.h5ad), "--model", str(_folder_with(
        t / "sm", {"config.json": "{", "model.safetensors": ""})), "--out", str(t / "e.h5ad")], t / "e.h5ad",
        ["config.json"]),
    "stofm pretrain config malformed": lambda c, t, f: ("stofm", ["pretrain", "--config", str(_write(
        t / "p.yaml", "data: [a\n")), "--output-dir", str(t / "pre")], t / "pre", ["p.yaml"]),
    "stofm convert truncated checkpoint": lambda c, t, f: ("stofm", ["convert", str(_write(t / "se2.pth", "PK\x03")),
                                                           "--out", str(t / "conv")], t / "conv", ["se2.pth"]),
    "stofm convert another architecture": lambda c, t, f: ("stofm", ["convert", str(_torch_save(
        t / "resnet.pth", {"conv1.weight": np.zeros((2, 2), np.float32)})), "--out", str(t / "conv")], t / "conv",
        ["resnet.pth", "not an SToFM"]),
    # data fetch
    "fetch unknown data set": lambda c, t, f: ("stalign", ["data", "fetch", "nonsense", "--dest", str(t / "d")],
                                               t / "d", ["nonsense"]),
    "fetch into a foreign folder": lambda c, t, f: ("stalign", ["data", "fetch", "squidpy-visium-crop", "--dest",
                                                    str(_folder_with(t / "mine", {"thesis.docx": "x"}))],
                                                   None, ["mine"]),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _torch_save(path: Path, arrays: dict) -> Path:
    import torch

    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _folder_with(path: Path, files: dict[str, str]) -> Path:
    _mkdir(path)
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def _copy_with(src: Path, dest: Path, edit) -> Path:
    """A copy of the good folder ``src`` at ``dest`` with ``edit`` applied to it."""
    folder = copy_tree(src, dest)
    edit(folder)
    return folder


def _shards_with(ctx, t: Path, edit) -> Path:
    return _copy_with(ctx.shards, t / "shards", edit)


def _ckpt_with(ctx, t: Path, edit) -> Path:
    return _copy_with(ctx.ckpt, t / "ckpt", edit)


def _bank_with(ctx, t: Path, edit) -> Path:
    return _copy_with(ctx.bank, t / "bank", edit)


def _head_with(ctx, t: Path, edit) -> Path:
    return _copy_with(ctx.head, t / "head", edit)


def _scribble(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[len(data) // 2: len(data) // 2 + 2048] = np.random.default_rng(1).bytes(2048)
    (folder / "model.safetensors").write_bytes(bytes(data))


def test_the_suite_is_large_enough():
    assert len(CASES) >= 60
    commands = {c.split()[0] for c in CASES}
    assert {"prep", "train", "predict", "retrieve", "bench", "fewshot", "stofm", "fetch"} <= commands


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line(name, ctx, tmp_path, fetched, capsys):
    from stalign.cli import main as stalign_main
    from stofm.cli import main as stofm_main

    program, argv, out, needles = CASES[name](ctx, tmp_path, fetched)
    capsys.readouterr()
    with _no_warning_filter():
        rc = (stalign_main if program == "stalign" else stofm_main)(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc not in (0, None), f"{name}: exit code {rc}\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{name}: expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{program} "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{name}: {needle!r} not in {lines[0]!r}"
    if out is not None:
        assert not Path(out).exists(), f"{name}: {out} was written"


class _no_warning_filter:
    """Warnings (e.g. 'obs names not unique') stay warnings: the suite checks the error line, not them."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_debug_keeps_the_traceback(tmp_path):
    from stofm.cli import main as stofm_main

    garbage(tmp_path / "g.h5ad")
    with pytest.raises(ValueError, match="g.h5ad"):
        stofm_main(["--debug", "embed", str(tmp_path / "g.h5ad"), "--model", "stofm-tiny", "--out",
                    str(tmp_path / "e.h5ad")])
