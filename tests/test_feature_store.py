"""The feature store: shard embeddings reused across runs, a new entry whenever a key part changes (weights, crop
spec, shard file, manifest entry), one computation under two concurrent writers, --no-cache, the size reported."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stalign.data import expression as ex
from stalign.data import shards
from stalign.data.feature_store import FeatureStore, module_weights_sha256
from stalign.tasks import embed
from stofm.util.knn import neighbor_indices

P, N, GENES = 32, 24, [f"g{i}" for i in range(8)]


@pytest.fixture()
def root(tmp_path):
    """Two tiny shards of random crops (24 spots, 32 px, 8 genes)."""
    rng = np.random.default_rng(0)
    out = tmp_path / "shards"
    entries = []
    for sid in ("a", "b"):
        xy = rng.uniform(0, 500, (N, 2))
        expr = rng.poisson(2.0, (N, len(GENES))).astype(np.float32)
        patches = rng.integers(0, 255, (N, P, P, 3), dtype=np.uint8)
        with shards.ShardWriter(out / shards.shard_relpath(sid), slide_id=sid, n_spots=N, patch_px=P, genes=GENES,
                                um_per_px=1.0) as w:
            w.write_patches(0, patches, patches[:, ::-1])
            w.finish(expr=expr, niche_expr=ex.niche_expression(expr, xy, 100.0), coords_px=xy, coords_um=xy,
                     neighbors=neighbor_indices(xy, 4), padded=np.zeros(N, bool), barcodes=[f"s{i}" for i in range(N)])
        entries.append({"slide_id": sid, "shard": shards.shard_relpath(sid), "n_spots": N})
    shards.write_manifest(out, {"format": shards.FORMAT, "version": shards.VERSION, "genes": GENES, "spot_um": 32.0,
                                "niche_um": 96.0, "patch_px": P, "resample": "bilinear", "slides": entries})
    return out


def _model(seed: int = 0):
    import stalign

    torch.manual_seed(seed)
    return stalign.create_model("stalign-tiny", genes=GENES)


@pytest.fixture()
def counted(monkeypatch):
    """Counts the shards actually embedded (``embed._embed_dataset`` calls)."""
    calls = []
    real = embed._embed_dataset

    def counting(model, ds, **kw):
        calls.append(list(ds.slide_ids[k] for k in sorted({ds.slide_of(i) for i in range(len(ds))})))
        return real(model, ds, **kw)

    monkeypatch.setattr(embed, "_embed_dataset", counting)
    return calls


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.npy"))


def test_second_run_reads_the_store_and_reports_its_size(root, counted):
    model = _model()
    first = embed.embed_shards(model, root, progress=False, device="cpu")
    assert counted == [["a"], ["b"]] and first["store"].computed == 2 and first["store"].hits == 0
    second = embed.embed_shards(model, root, progress=False, device="cpu")
    assert len(counted) == 2 and second["store"].hits == 2  # nothing embedded again
    for key in ("image", "gene", "expression", "coords_um"):
        np.testing.assert_array_equal(second[key], first[key])
    assert second["slide_id"].tolist() == first["slide_id"].tolist() == ["a"] * N + ["b"] * N
    folder = root / "features"
    assert _files(folder) == sorted(f"{s}/{o}-{h}" for s in "ab" for o in ("gene", "image")
                                    for h in [p.name.split("-", 1)[1] for p in (folder / s).glob(f"{o}-*.npy")])
    n, size = second["store"].size()
    assert n == 4 and size == sum(p.stat().st_size for p in folder.rglob("*") if p.suffix in (".npy", ".json"))
    assert f"2 shard(s) reused, 0 computed; 4 arrays, {size / 2**20:.1f} MiB" in second["store"].summary()
    # the image embeddings alone are the same entries (gene=False reads the stored image arrays)
    only = embed.embed_shards(model, root, gene=False, progress=False, device="cpu")
    assert len(counted) == 2 and only["gene"] is None
    np.testing.assert_array_equal(only["image"], first["image"])
    # a subset of slides in another order: the stored arrays in that order
    ba = embed.embed_shards(model, root, slides=["b", "a"], progress=False, device="cpu")
    np.testing.assert_array_equal(ba["image"], np.concatenate([first["image"][N:], first["image"][:N]]))
    # spots picked across slides in any order (embedded directly): rows, slide ids and coordinates in that order
    pick = [N + 3, 0, N + 1, 5]
    some = embed.embed_shards(model, root, indices=pick, progress=False, device="cpu")
    np.testing.assert_allclose(some["image"], first["image"][pick], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(some["coords_um"], first["coords_um"][pick])
    assert some["slide_id"].tolist() == ["b", "a", "b", "a"]


def _change_weights(root, model):
    with torch.no_grad():
        next(model.spot_image_encoder.parameters()).add_(0.5)
    return model


def _change_crop(root, model):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "resample": "lanczos"}))
    return model


def _touch_shard(root, model):
    shard = root / "shards" / "a.h5"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return model


def _change_entry(root, model):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    m["slides"][0]["n_background_dropped"] = 3
    path.write_text(json.dumps(m))
    return model


@pytest.mark.parametrize("change, again", [(_change_weights, ["a", "b"]), (_change_crop, ["a", "b"]),
                                           (_touch_shard, ["a"]), (_change_entry, ["a"])])
def test_each_key_part_invalidates(root, counted, change, again):
    model = _model()
    first = embed.embed_shards(model, root, gene=False, progress=False, device="cpu")
    model = change(root, model)
    after = embed.embed_shards(model, root, gene=False, progress=False, device="cpu")
    assert [s for call in counted[2:] for s in call] == again
    assert after["store"].computed == len(again) and after["store"].hits == 2 - len(again)
    if change is _change_weights:
        assert not np.allclose(after["image"], first["image"])
        assert len(_files(root / "features")) == 4  # another encoder: both kept
    else:
        np.testing.assert_allclose(after["image"], first["image"], rtol=1e-5, atol=1e-6)
        assert len(_files(root / "features")) == 2  # the stale entries of the same encoder were removed


def test_no_cache_computes_and_writes_nothing(root, counted):
    from stalign.cli import build_parser

    model = _model()
    embed.embed_shards(model, root, progress=False, device="cpu")
    off = embed.embed_shards(model, root, progress=False, device="cpu", cache=False)
    assert len(counted) == 3 and off["store"].computed == 2 and "off (--no-cache)" in off["store"].summary()
    assert len(_files(root / "features")) == 4
    parser = build_parser()
    for argv in (["bench", "--shards", "S", "--encoders", "x"], ["predict", "--model", "M", "--slide", "s", "--out",
                 "o.h5ad"], ["retrieve", "bank", "--model", "M", "--shards", "S", "--out", "B"],
                 ["fewshot", "--model", "M", "--shards", "S", "--out", "H"]):
        assert parser.parse_args([*argv, "--no-cache"]).no_cache and not parser.parse_args(argv).no_cache


def test_unwritable_shards_folder_goes_to_the_user_cache(root, monkeypatch, tmp_path):
    monkeypatch.setenv("STALIGN_CACHE", str(tmp_path / "cache"))
    (root / "features").write_text("not a folder")  # the folder beside the shards cannot be made
    store = FeatureStore(root)
    assert store.folder.parent == tmp_path / "cache" / "features"
    got = store.arrays({"kind": "test"}, ["x"], "a", lambda: {"x": np.arange(N)})
    assert got["x"].tolist() == list(range(N)) and store.size()[0] == 1


def test_a_damaged_entry_is_computed_again(root):
    store = FeatureStore(root)
    store.arrays({"kind": "test"}, ["x"], "a", lambda: {"x": np.arange(N)})
    (npy,) = (root / "features" / "a").glob("x-*.npy")
    npy.write_bytes(b"garbage")
    again = FeatureStore(root)
    assert again.arrays({"kind": "test"}, ["x"], "a", lambda: {"x": np.arange(N) * 2})["x"][1] == 2
    assert again.computed == 1
    with pytest.raises(ValueError):  # a result with another number of rows than the shard's spots is refused
        FeatureStore(root).arrays({"kind": "other"}, ["x"], "a", lambda: {"x": np.arange(N - 1)})


def test_two_processes_compute_an_entry_once(root, tmp_path):
    """Two writers of the same entry at once: one computes (slowly), the other waits for its lock and reads."""
    log = tmp_path / "computed.log"
    script = textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        import numpy as np
        from stalign.data.feature_store import FeatureStore
        ready = Path({str(tmp_path)!r}) / f"ready.{{os.getpid()}}"
        ready.touch()
        while len(list(ready.parent.glob("ready.*"))) < 2:  # both processes start writing together
            time.sleep(0.02)
        def compute():
            with open({str(log)!r}, "a") as fh:
                fh.write("computed\\n")
            time.sleep(1.5)
            return {{"x": np.arange({N}) * 3.0}}
        store = FeatureStore({str(root)!r}, log=lambda m: print(m, flush=True))
        x = store.arrays({{"kind": "slow"}}, ["x"], "a", compute)["x"]
        print("hits", store.hits, "sum", x.sum(), flush=True)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert log.read_text().count("computed") == 1
    assert sorted(o.strip().splitlines()[-1] for o in outs) == [f"hits {h} sum {3.0 * N * (N - 1) / 2}"
                                                                for h in (0, 1)]
    assert any("waiting for another process computing the features of a" in o for o in outs)


def test_module_weights_checksum_follows_the_weights():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert module_weights_sha256(a) == module_weights_sha256(b)
    with torch.no_grad():
        b.bias[0] += 1e-6
    assert module_weights_sha256(a) != module_weights_sha256(b)
    assert module_weights_sha256(a.to(torch.bfloat16)) != module_weights_sha256(b)


def test_bench_second_run_reads_every_feature_from_the_store(root, monkeypatch):
    from stalign.tasks import bench, embed

    kw = dict(by="slide", k_genes=4, latent_dim=4, progress=False, device="cpu")
    first = bench.bench_shards(root, ["random:timm:test_vit"], **kw)
    assert "0 shard(s) reused, 4 computed" in first.attrs["feature_store"]

    def no_reading(*args, **kwargs):
        raise AssertionError("patches read again")

    monkeypatch.setattr(embed, "shard_batches", no_reading)
    second = bench.bench_shards(root, ["random:timm:test_vit"], **kw)
    assert "4 shard(s) reused, 0 computed; 4 arrays" in second.attrs["feature_store"]
    assert second[["encoder", "pearson_mean", "mse"]].equals(first[["encoder", "pearson_mean", "mse"]])


def test_frozen_encoders_train_from_stored_features_as_from_pixels(root):
    """Training with frozen image encoders can read their trunk features from the store: the model's outputs (and
    so the loss) are those of the crops; a trainable encoder is refused."""
    import stalign
    from stalign.data.dataset import ShardDataset, collate
    from stalign.data.feature_store import frozen_image_features
    from stalign.training.losses import ThreeTargetLoss

    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=GENES, spot_image={"freeze": True},
                                 niche_image={"freeze": True}).eval()
    feats = frozen_image_features(model, FeatureStore(root))
    assert FeatureStore(root).size()[0] == 4  # spot and niche of two shards
    again = FeatureStore(root)
    np.testing.assert_array_equal(frozen_image_features(model, again)["spot"], feats["spot"])
    assert again.hits == 2 and again.computed == 0  # one read per shard (both crops)
    batch = collate([ShardDataset(root)[i] for i in range(0, 2 * N, 5)])
    idx = batch["index"].numpy()
    stored = {**batch, "spot_image": torch.from_numpy(feats["spot"][idx]),
              "niche_image": torch.from_numpy(feats["niche"][idx])}
    with torch.no_grad():
        a, b = model(batch), model(stored)
        for key in ("spot_image_features", "niche_image_features", "fused_spot_features"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ThreeTargetLoss()(b)["loss"], ThreeTargetLoss()(a)["loss"])
    with pytest.raises(ValueError, match="columns"):
        model.spot_image_encoder(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="trains"):
        frozen_image_features(_model(), FeatureStore(root))


def test_ablation_baselines_come_from_the_store(root, monkeypatch):
    from stalign.lab import ablation_eval
    from stalign.tasks.baselines import colour_features
    from stalign.tasks.feature_store import open_store

    first = ablation_eval.baseline_features(root, imagenet=False)
    assert list(first) == list(ablation_eval.BASELINES[:2])
    spot = np.concatenate([shards.read_shard(root / e["shard"], patches=True)["spot_patches"]
                           for e in open_store(root).entries.values()])
    np.testing.assert_array_equal(first[ablation_eval.BASELINES[0]], colour_features(spot))
    monkeypatch.setattr(shards, "read_shard", lambda *a, **k: (_ for _ in ()).throw(AssertionError("read")))
    again = ablation_eval.baseline_features(root, imagenet=False)
    for name, x in first.items():
        np.testing.assert_array_equal(again[name], x)
