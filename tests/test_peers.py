"""benchmarks/peers.py --quick: stalign and the peers run on the same generated slide and bank, and the peers cut
the same spot crops as stalign prep (so the ratios compare like with like)."""
from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_peer_runners_cut_the_spots_stalign_cuts(tmp_path):
    from peer_prep import make_slide, run_hest, run_plain, run_stalign

    tif, h5ad = make_slide(tmp_path / "slide", size_px=4096, n_spots=12)
    n = run_stalign(tif, h5ad, tmp_path / "s", n_top_genes=5)
    assert run_plain(tif, h5ad, tmp_path) == run_hest(tif, h5ad, tmp_path) == n == 12  # all spots on tissue
    with h5py.File(tmp_path / "s/shards/slide.h5") as s, h5py.File(tmp_path / "plain.h5") as p, \
            h5py.File(tmp_path / "hest_patches.h5") as h:
        ours, plain, hest = s["spot_patches"][()].astype(float), p["img"][()].astype(float), h["img"][()]
        np.testing.assert_allclose(s["coords_px"][()], p["coords"][()])
    assert ours.shape == plain.shape == hest.shape == (12, 224, 224, 3)
    np.testing.assert_array_equal(hest, plain)  # the HEST-style dump stores what the plain loop does
    # the same regions: stalign's crops are resampled at sub-pixel centres, the peers' read at whole pixels
    assert np.abs(ours - plain).mean() < 8 and np.abs(ours - plain[::-1]).mean() > 1.5 * np.abs(ours - plain).mean()


def test_quick_run_prints_and_records_every_workload(tmp_path, capsys):
    import peers

    results = tmp_path / "RESULTS.md"
    peers.main(["--quick", "--record", "--results", str(results), "--cache", str(tmp_path / "cache")])
    text = results.read_text()
    for row in ("stalign prep, 1 worker", "stalign prep, 2 workers", "HEST-style per-patch dump",
                "plain openslide + h5py loop", "scaling, 2 vs 1 workers", "stalign fast_topk.search",
                "plain torch fp32 matmul", "stalign predict path", "plain read_region + bilinear"):
        assert row in text, row
    assert "load average before/after" in text and "machine:" in text
    try:
        import faiss  # noqa: F401
    except ImportError:
        assert "faiss not installed" in capsys.readouterr().out
    else:
        assert "IndexFlatIP" in text


def test_runners_prepare_several_slides_in_one_run(tmp_path):
    """``--slides N``: each method prepares N copies one after another; stalign writes one shard per slide, each
    equal to a one-slide prep's, with one and with two workers."""
    from peer_prep import make_slide, run_hest, run_plain, run_stalign

    tif, h5ad = make_slide(tmp_path / "slide", size_px=4096, n_spots=12)
    assert run_plain(tif, h5ad, tmp_path, slides=3) == run_hest(tif, h5ad, tmp_path, slides=3) == 36
    assert sorted(p.name for p in tmp_path.glob("plain*.h5")) == ["plain.h5", "plain_1.h5", "plain_2.h5"]
    assert run_stalign(tif, h5ad, tmp_path / "one", n_top_genes=5) == 12
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert run_stalign(tif, h5ad, out, workers=workers, slides=3, n_top_genes=5) == 36
        assert sorted(p.name for p in (out / "shards").glob("*.h5")) == ["slide.h5", "slide_1.h5", "slide_2.h5"]
        for name in ("slide.h5", "slide_2.h5"):
            with h5py.File(tmp_path / "one/shards/slide.h5") as a, h5py.File(out / "shards" / name) as b:
                for key in ("spot_patches", "niche_patches", "expr", "niche_expr", "neighbors"):
                    np.testing.assert_array_equal(a[key][()], b[key][()], err_msg=f"{name} {key}")
