"""The fast paths (stalign.models.perf, stalign.tasks.fast_topk) give the plain path's results; benchmarks run end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stalign.models.perf import (
    CompiledOrEager,
    FastEmbedder,
    autocast_dtype,
    inference_context,
    is_cnn,
    should_compile,
)
from stalign.tasks.fast_topk import exact_topk, prepare_bank, recall, search

REPO = Path(__file__).resolve().parents[1]
GENES = [f"g{i}" for i in range(12)]


@pytest.fixture(scope="module")
def tiny_model():
    import stalign

    torch.manual_seed(0)
    return stalign.create_model("stalign-tiny", genes=GENES).eval()


@pytest.fixture(scope="module")
def crops():
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=g),
            torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8, generator=g))


def plain(model, spot, niche):
    with torch.inference_mode():
        return model.encode_image(spot, niche).float()


def rel_err(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_precision_defaults():
    assert autocast_dtype("cpu") is None  # the CPU default stays fp32
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast_dtype("cpu", "int8")
    assert not should_compile("cpu", "auto", n_items=10**6)  # never by default on the CPU


def test_cpu_default_fast_path_is_the_plain_path(tiny_model, crops):
    out = FastEmbedder(model=tiny_model, device="cpu")(*crops)
    assert FastEmbedder(model=tiny_model, device="cpu").settings() == {
        "device": "cpu", "autocast": "fp32", "channels_last": False, "compile": False}
    torch.testing.assert_close(out, plain(tiny_model, *crops), rtol=0, atol=0)


def test_bf16_autocast_within_bf16_tolerance(tiny_model, crops):
    ref = plain(tiny_model, *crops)
    fast = FastEmbedder(model=tiny_model, device="cpu", precision="bf16")
    out = fast(*crops)
    assert out.dtype == torch.float32 and fast.settings()["autocast"] == "bfloat16"
    err = rel_err(out, ref)
    assert 0 < err < 3e-2, err  # bf16 really ran (not bit-identical), and stayed within bf16 rounding
    assert float((out * ref).sum(1).min()) > 0.999  # same direction (cosine) per spot


def test_channels_last_same_outputs(tiny_model, crops):
    assert is_cnn(tiny_model.niche_image_encoder) and not is_cnn(tiny_model.spot_image_encoder)
    fast = FastEmbedder(model=tiny_model, device="cpu", channels_last=True)
    assert fast.channels_last
    conv = next(m for m in tiny_model.niche_image_encoder.modules() if isinstance(m, torch.nn.Conv2d) and
                m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(*crops), plain(tiny_model, *crops), rtol=1e-4, atol=1e-5)
    tiny_model.to(memory_format=torch.contiguous_format)


def test_compile_fallback_runs_eager(tiny_model, crops):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    ref = plain(tiny_model, *crops)
    fast = FastEmbedder(model=tiny_model, device="cpu", compile=True, compile_backend=broken_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed, running eager"):
        out = fast(crops[0][:4], crops[1][:4])
    torch.testing.assert_close(out, ref[:4], rtol=1e-5, atol=1e-6)
    assert fast.settings()["compile"] is False
    torch.testing.assert_close(fast(*crops), ref, rtol=1e-5, atol=1e-6)


def test_compiled_short_batch_is_padded_and_trimmed(tiny_model, crops):
    fast = FastEmbedder(model=tiny_model, device="cpu", compile=True, compile_backend="eager")
    full, short = fast(crops[0][:4], crops[1][:4]), fast(crops[0][4:], crops[1][4:])
    assert short.shape == (2, tiny_model.config.embed_dim)
    torch.testing.assert_close(torch.cat([full, short]), plain(tiny_model, *crops), rtol=1e-5, atol=1e-6)
    assert fast.settings()["compile"] is True


def test_encode_one_input_model(tiny_model, crops):
    enc = tiny_model.niche_image_encoder
    with torch.inference_mode():
        ref = enc(crops[1]).float()
    fast = FastEmbedder(model=enc, device="cpu", precision="bf16", channels_last=True, compile=True,
                        compile_backend="eager")
    out = torch.cat([fast.encode(crops[1][:4]), fast.encode(crops[1][4:])])  # short batch padded, trimmed
    assert out.shape == ref.shape and 0 < rel_err(out, ref) < 3e-2
    enc.to(memory_format=torch.contiguous_format)


def test_compiled_or_eager_plain_function():
    fn = CompiledOrEager(lambda x: x * 2 + 1, backend="eager")
    x = torch.arange(5.0)
    torch.testing.assert_close(fn(x), x * 2 + 1)
    assert not fn.failed


def test_inference_context_restores_train_mode(tiny_model, crops):
    tiny_model.train()
    with inference_context(tiny_model, "cpu", "bf16") as m:
        assert not m.training and torch.is_inference_mode_enabled()
        assert m.encode_image(*crops).shape[0] == 6
    assert tiny_model.training
    tiny_model.eval()


def clustered(n: int, q: int, dim: int, seed: int):
    """Embeddings around 64 centres: many near-ties, as real spots of similar tissue give."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim))
    return (centres[rng.integers(0, 64, n)] + 0.6 * rng.normal(size=(n, dim)),
            centres[rng.integers(0, 64, q)] + 0.6 * rng.normal(size=(q, dim)))


@pytest.mark.parametrize("n", [7, 100, 5000])
def test_fast_topk_equals_exact_fp32(n):
    bank, q = clustered(n, 33, 16, seed=n)
    k = min(5, n)
    es, ei = exact_topk(q, bank, k)
    s, i = search(torch.tensor(q), prepare_bank(bank, dtype=torch.float32), k, chunk=1000, query_chunk=10,
                  group=8)
    np.testing.assert_array_equal(i.numpy(), ei)
    np.testing.assert_allclose(s.numpy(), es, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_bank_recall(dtype):
    bank, q = clustered(20_000, 200, 64, seed=3)
    _, ei = exact_topk(q, bank, 50)
    s, i = search(torch.tensor(q), prepare_bank(bank, dtype=dtype), 50, chunk=8192)
    assert recall(i.numpy(), ei) >= 0.99
    # the returned similarities are exact (re-scored in float32) for the indices found
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    bn = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    np.testing.assert_allclose(s.numpy(), np.einsum("qe,qke->qk", qn, bn[i.numpy()]), atol=1e-5)
    raw = search(torch.tensor(q), prepare_bank(bank, dtype=dtype, rescore=False), 50, chunk=8192)[1]
    assert recall(raw.numpy(), ei) < 1.0  # without re-scoring low precision does lose neighbours here


def test_recall_counts_overlap():
    assert recall([[1, 2, 3]], [[3, 2, 9]]) == pytest.approx(2 / 3)


def test_search_rejects_bad_k():
    with pytest.raises(ValueError, match="k must lie in 1..3"):
        search(torch.ones(2, 4), prepare_bank(np.ones((3, 4))), 4)


@pytest.mark.parametrize("script", ["retrieval", "embed_throughput", "train_step", "wsi_predict", "resample_filter"])
def test_benchmark_quick(script, tmp_path, subprocess_env):
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--quick",
                           "--results", str(results)], cwd=tmp_path, env=subprocess_env, capture_output=True, check=False,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = results.read_text()
    assert "- command: `" in text and "| --- |" in text and "device: cpu" in text.lower()


@pytest.mark.gpu
def test_cuda_default_fast_path_within_bf16_tolerance(tiny_model, crops):
    ref = plain(tiny_model.float().cpu(), *crops)
    fast = FastEmbedder(model=tiny_model, device="cuda")
    assert fast.settings()["autocast"] in ("bfloat16", "float16") and fast.channels_last
    out = fast(*crops).cpu()
    assert rel_err(out, ref) < 3e-2
    tiny_model.cpu().to(memory_format=torch.contiguous_format)


@pytest.mark.gpu
def test_cuda_bank_search_recall():
    bank, q = clustered(50_000, 400, 128, seed=5)  # (bank, queries)
    _, ei = exact_topk(q, bank, 50)
    dev = prepare_bank(bank, device="cuda")  # default on CUDA: bf16 + exact re-scoring, group-max top-k
    assert dev.scores.dtype == torch.bfloat16 and dev.exact is not None
    _, i = search(torch.tensor(q), dev, 50, chunk=16384)
    assert recall(i.cpu().numpy(), ei) >= 0.99


def test_cpu_bf16_search_returns_exact_scores_at_full_recall(monkeypatch):
    """The CPU path for banks in bf16 (native bf16 matmuls, int16-ordered top-k, exact fp32 re-scoring): the same
    top-k as the exact fp32 search on a clustered bank with near-ties, and the fp32 similarities."""
    from stalign.tasks import fast_topk
    from stalign.tasks.fast_topk import exact_topk, prepare_bank, recall, search

    monkeypatch.setattr(fast_topk, "cpu_has_fast_bf16", lambda: True)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(64, 32, generator=g)
    bank = centres[torch.randint(0, 64, (20_000,), generator=g)] + 0.5 * torch.randn(20_000, 32, generator=g)
    queries = -bank[:40] + 0.1 * torch.randn(40, 32, generator=g)  # some rows have mostly negative scores
    queries[:20] = bank[:20] + 0.1 * torch.randn(20, 32, generator=g)
    ref_sims, ref_idx = exact_topk(queries.numpy(), bank.numpy(), 50)
    sims, idx = search(queries, prepare_bank(bank, dtype=torch.bfloat16), 50, chunk=4096, query_chunk=16)
    assert recall(idx.numpy(), ref_idx) >= 0.99
    np.testing.assert_allclose(sims.numpy(), ref_sims, atol=1e-5)


def test_bf16_topk_orders_negative_rows_correctly():
    from stalign.tasks.fast_topk import _bf16_topk

    s = torch.tensor([[-0.5, -0.1, -0.9, -0.2], [0.3, -0.4, 0.9, 0.1]]).to(torch.bfloat16)
    v, i = _bf16_topk(s, 2)
    assert sorted(i[0].tolist()) == [1, 3] and sorted(i[1].tolist()) == [0, 2]


def test_bf16_group_topk_finds_the_exact_top_k_values():
    """The group-max path of ``_bf16_topk`` (wide chunks): the same k values as a float ``topk``, positive and
    negative rows alike, and indices that point at them."""
    from stalign.tasks.fast_topk import _bf16_topk

    g = torch.Generator().manual_seed(0)
    s = (torch.randn(12, 32768, generator=g) * 0.3).to(torch.bfloat16)
    s[:4] += 0.5
    s[4:8] -= 0.6  # rows whose top-k is negative (redone in float)
    v, i = _bf16_topk(s, 100)
    expected = s.float().topk(100, dim=1).values
    torch.testing.assert_close(v.float().sort(dim=1, descending=True).values, expected, rtol=0, atol=0)
    torch.testing.assert_close(s.float().gather(1, i).sort(dim=1, descending=True).values, expected, rtol=0, atol=0)


def test_search_dtype_follows_the_hardware_and_bank_size(monkeypatch):
    from stalign.tasks import fast_topk

    monkeypatch.setattr(fast_topk, "cpu_has_fast_bf16", lambda: True)
    assert fast_topk.search_dtype("cpu", n_rows=200_000) == torch.bfloat16
    assert fast_topk.search_dtype("cpu", n_rows=1_000) == torch.float32  # small banks stay fp32
    assert fast_topk.search_dtype("cpu", torch.float16, n_rows=1_000) == torch.float16
    monkeypatch.setattr(fast_topk, "cpu_has_fast_bf16", lambda: False)
    assert fast_topk.search_dtype("cpu", n_rows=200_000) == torch.float32
