"""Training splits use every spot not held out for scoring: on a synthetic grid slide, a block split with a
``val_max_spots`` cap scores at most the cap, keeps a niche-wide margin around the scored spots only and trains
on everything else; the printed counts are the split's."""
from __future__ import annotations

import numpy as np
import pytest

from stalign.data import shards
from stalign.data.dataset import ShardDataset, split_indices
from stofm.util.knn import neighbor_indices

P, PITCH_UM, NICHE_UM, SIDE = 8, 100.0, 250.0, 30  # a 30 x 30 grid at 100 µm: 900 spots, blocks of 5 x 5


def _write_grid(root, slide_ids=("grid",)) -> None:
    gx, gy = np.meshgrid(np.arange(SIDE), np.arange(SIDE))
    um = np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64) * PITCH_UM
    genes = ["g0", "g1", "g2"]
    entries = []
    for sid in slide_ids:
        expr = np.random.default_rng(len(entries)).random((len(um), len(genes))).astype(np.float32)
        patches = np.zeros((len(um), P, P, 3), np.uint8)
        with shards.ShardWriter(root / shards.shard_relpath(sid), slide_id=sid, n_spots=len(um), patch_px=P,
                                genes=genes, um_per_px=1.0) as w:
            w.write_patches(0, patches, patches)
            w.finish(expr=expr, niche_expr=expr, coords_px=um, coords_um=um, neighbors=neighbor_indices(um, 4),
                     padded=np.zeros(len(um), bool), barcodes=[f"{sid}-{i}" for i in range(len(um))])
        entries.append({"slide_id": sid, "shard": shards.shard_relpath(sid), "n_spots": len(um)})
    shards.write_manifest(root, {"format": shards.FORMAT, "version": shards.VERSION, "genes": genes,
                                 "spot_um": P, "niche_um": NICHE_UM, "patch_px": P, "slides": entries})


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    _write_grid(root)
    return root


def _margin_holds(xy: np.ndarray, train: np.ndarray, val: np.ndarray) -> bool:
    """No training spot closer than NICHE_UM (in x or y) to a scored spot."""
    gap = np.abs(xy[train][:, None, :] - xy[val][None, :, :]).max(-1)
    return bool((gap >= NICHE_UM).all())


def test_capped_block_split_trains_on_every_spot_outside_the_margin_of_scored_spots(grid):
    ds = ShardDataset(grid)
    xy = ds._arrays(0)["coords_um"].astype(np.float64)
    held_all = split_indices(ds, val_fraction=0.3, by="block", seed=2)[1]
    train, val = split_indices(ds, val_fraction=0.3, by="block", seed=2, max_val=40)
    assert len(val) == 40 < len(held_all) and set(val) <= set(held_all)
    assert set(train).isdisjoint(val) and _margin_holds(xy, train, val)
    # the spots in neither set are exactly those within the margin of a scored spot
    left = np.setdiff1d(np.arange(len(ds)), np.concatenate([train, val]))
    assert len(train) + len(val) + len(left) == len(ds)
    near = np.abs(xy[left][:, None, :] - xy[val][None, :, :]).max(-1).min(1)
    assert (near < NICHE_UM).all()
    # held-out spots beyond the cap, away from the scored ones, are trained on
    assert len(np.intersect1d(train, np.setdiff1d(held_all, val))) > 0
    # the scored spots form one compact patch (the first drawn block, from its centre out), so the margin is a
    # ring around 40 spots: on this grid a 7 x 7 square at most (margin: spots within 2 steps => 11 x 11 - 49)
    assert len(left) <= 11 * 11 - 40
    # seeded: the same split again; another seed another one
    again = split_indices(ds, val_fraction=0.3, by="block", seed=2, max_val=40)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)
    assert not np.array_equal(split_indices(ds, val_fraction=0.3, by="block", seed=3, max_val=40)[1], val)


def test_uncapped_block_split_is_unchanged_and_other_splits_respect_the_cap(grid, tmp_path):
    ds = ShardDataset(grid)
    xy = ds._arrays(0)["coords_um"].astype(np.float64)
    train, val = split_indices(ds, val_fraction=0.3, by="block", seed=2)
    assert _margin_holds(xy, train, val) and len(val) > 40
    assert split_indices(ds, val_fraction=0.3, by="block", seed=2, max_val=10_000)[1].tolist() == val.tolist()
    train, val = split_indices(ds, val_fraction=0.3, by="spot", seed=2, max_val=25)
    assert len(val) == 25 and len(train) == len(ds) - 25  # a spot split leaves nothing out
    two = tmp_path / "two"
    _write_grid(two, ("a", "b"))
    train, val = split_indices(ShardDataset(two), val_fraction=0.5, by="slide", seed=0, max_val=30)
    assert len(train) == SIDE * SIDE and len(val) == 30  # the rest of the held-out slide is never trained on
    with pytest.raises(ValueError, match="val_max_spots must be >= 0"):
        split_indices(ds, val_fraction=0.3, by="block", max_val=-1)


def test_printed_counts_are_the_split(grid, tmp_path, capsys):
    from stalign.training.data import build_train_data
    from stalign.training.trainer import train_from_config

    split = {"val_fraction": 0.3, "split_by": "block", "seed": 2}
    data = build_train_data(root=grid, slides=None, niche_spots=4, train_transforms=None, eval_transforms=None,
                            val_max_spots=40, **split)
    train, val = split_indices(ShardDataset(grid), val_fraction=0.3, by="block", seed=2, max_val=40)
    assert (data.n_train, data.n_val) == (len(train), len(val)) == (len(data.train), len(data.val))
    assert data.n_left_out == SIDE * SIDE - len(train) - len(val) > 0
    train_from_config("configs/tiny_test.yaml", data=str(grid), output_dir=str(tmp_path), max_steps=1,
                      val_max_spots=40, save_every=0, **split)
    assert (f"training {len(train)} spots ({len(val)} held out for scoring, {data.n_left_out} left out: the "
            "niche-wide margin around the scored validation spots) of 3 genes") in capsys.readouterr().out
