"""A second `stalign bench` on the same shards does only what a cache hit needs: no encoder built when its weights
checksum is recorded (and recomputed when its weight file changes), the PCA + ridge in exact closed form."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from stalign.data.feature_store import module_weights_sha256
from stalign.tasks import bench, feature_store
from stalign.tasks.feature_store import spec_weights_sha256
from stalign.tasks.hest import RidgeProbe


@pytest.mark.parametrize("n, p, k, intercept", [(300, 40, 256, True), (300, 40, 10, True), (50, 120, 30, True),
                                                (50, 120, 256, False), (200, 80, None, True), (200, 80, None, False)])
def test_exact_probe_is_the_sklearn_pipeline_solved_exactly(n, p, k, intercept):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, p)) @ rng.standard_normal((p, p))
    x[:, 3] = 2.0  # a constant feature keeps scale 1
    y = x[:, :5] @ rng.standard_normal((5, 7)) + rng.standard_normal((n, 7)) + 3.0
    x_test = rng.standard_normal((20, p))
    kept = min(k, n, p) if k else p
    steps = [("scale", StandardScaler()), ("pca", PCA(kept, svd_solver="full"))] if k else []
    ref = Pipeline([*steps, ("ridge", Ridge(alpha=100 / (kept * 7), solver="cholesky", fit_intercept=intercept))])
    expected = ref.fit(x, y).predict(x_test)
    got = RidgeProbe(latent_dim=k, fit_intercept=intercept, solver="exact").fit(x, y).predict(x_test)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-8 * np.abs(expected).max())


@pytest.fixture()
def counted_builds(monkeypatch, tmp_path):
    """The user cache in ``tmp_path``; the list of encoder specs built by ``bench``."""
    monkeypatch.setenv("STALIGN_CACHE", str(tmp_path / "cache"))
    built: list[str] = []
    real = bench.PatchEncoder

    class Counting(real):
        def __init__(self, spec, **kw):
            built.append(spec)
            super().__init__(spec, **kw)

    monkeypatch.setattr(bench, "PatchEncoder", Counting)
    return built


def test_second_bench_builds_no_encoder(small_shards, tmp_path, counted_builds):
    root = tmp_path / "shards"
    shutil.copytree(small_shards("synthetic"), root, ignore=shutil.ignore_patterns("features"))
    kw = dict(k_genes=6, latent_dim=8, progress=False, device="cpu")
    first = bench.bench_shards(root, ["random:timm:test_vit"], **kw)
    assert counted_builds == ["random:timm:test_vit"]
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["slides"][0]["site"] = "hospital A"  # a label changes no array: the features stay valid
    (root / "manifest.json").write_text(json.dumps(manifest))
    second = bench.bench_shards(root, ["random:timm:test_vit"], **kw)
    assert counted_builds == ["random:timm:test_vit"], "the encoder was built again on a full store hit"
    assert "0 computed" in second.attrs["feature_store"]
    assert second.drop(columns="task").equals(first.drop(columns="task"))
    bench.bench_shards(root, ["random:timm:test_vit"], seed=1, **kw)  # another seed: other weights, built
    assert counted_builds == ["random:timm:test_vit"] * 2


def test_weights_checksum_is_recorded_by_the_weight_file(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("STALIGN_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "w.pth"
    torch.manual_seed(0)
    net = timm.create_model("test_vit", num_classes=0)
    torch.save(net.state_dict(), path)
    builds = []

    def build():
        builds.append(1)
        return bench.PatchEncoder(str(path), arch="timm:test_vit").net

    first = spec_weights_sha256(str(path), arch="timm:test_vit", seed=None, build=build)
    assert spec_weights_sha256(str(path), arch="timm:test_vit", seed=None, build=build) == first
    assert len(builds) == 1  # recorded
    with torch.no_grad():
        next(net.parameters())[0] += 1.0
    torch.save(net.state_dict(), path)  # new weights in the same file: a new mtime, hashed again
    assert spec_weights_sha256(str(path), arch="timm:test_vit", seed=None, build=build) != first
    assert len(builds) == 2
    assert spec_weights_sha256(str(path), arch="timm:vit_other", seed=None, build=lambda: net) != first  # arch keys
    monkeypatch.setattr(feature_store, "MEMO_ENTRIES", 2)  # the memo keeps its newest entries
    spec_weights_sha256("random:x", arch=None, seed=1, build=lambda: net)
    memo = json.loads((tmp_path / "cache" / "features" / "weights_sha256.json").read_text())
    assert len(memo) == 2 and list(memo.values())[-1] == module_weights_sha256(net)
