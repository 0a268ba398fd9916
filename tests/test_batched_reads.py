"""Batched shard reads: ``ShardDataset.__getitems__`` gives exactly the collated per-item batch (raw and gzip
shards, several slides, any order), ``read_rows`` reads any layout, and a ``DataLoader`` keeps today's seeded
batch composition with any worker count."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from stalign.data import shards
from stalign.data.dataset import ShardDataset, collate
from stalign.data.patch_reads import read_rows
from stofm.util.knn import neighbor_indices

P, G = 8, 5


def _write(root, compression: str) -> None:
    rng = np.random.default_rng(0)
    entries = []
    for k, n in enumerate((13, 9)):
        sid = f"s{k}"
        xy = rng.uniform(0, 200, (n, 2))
        expr = rng.random((n, G)).astype(np.float32)
        with shards.ShardWriter(root / shards.shard_relpath(sid), slide_id=sid, n_spots=n, patch_px=P,
                                genes=[f"g{i}" for i in range(G)], um_per_px=1.0, compression=compression) as w:
            w.write_patches(0, rng.integers(0, 256, (n, P, P, 3), dtype=np.uint8),
                            rng.integers(0, 256, (n, P, P, 3), dtype=np.uint8))
            nb = neighbor_indices(xy, 4)
            nb[0, -1] = -1  # a missing neighbour
            w.finish(expr=expr, niche_expr=expr[::-1].copy(), coords_px=xy, coords_um=xy, neighbors=nb,
                     padded=np.zeros(n, bool), barcodes=[f"b{i}" for i in range(n)])
        entries.append({"slide_id": sid, "shard": shards.shard_relpath(sid), "n_spots": n})
    shards.write_manifest(root, {"format": shards.FORMAT, "version": shards.VERSION, "genes": [f"g{i}" for i in range(G)],
                                 "spot_um": 8.0, "niche_um": 60.0, "patch_px": P, "slides": entries})


@pytest.fixture(scope="module", params=["none", "gzip"])
def root(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"batched_{request.param}")
    _write(out, request.param)
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_getitems_is_the_collated_items(root):
    ds = ShardDataset(root, niche_spots=6)  # 6 > the 4 stored neighbours: padded rows stay zero
    positions = [20, 3, 0, 14, 7, 21, 3 + 13, 12]  # unsorted, both slides
    _same(ds.__getitems__(positions), collate([ds[i] for i in positions]))
    sub = ShardDataset(root, indices=[2, 5, 15, 17], niche_spots=2)
    _same(sub.__getitems__([3, 0, 2]), collate([sub[i] for i in (3, 0, 2)]))
    assert collate(sub.__getitems__([1])) is not None
    with pytest.raises(IndexError):
        sub.__getitems__([4])


def test_read_rows_any_layout(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, (7, P, P, 3), dtype=np.uint8)
    rows = np.asarray([5, 1, 6, 1])
    with h5py.File(tmp_path / "x.h5", "w") as f:
        for name, kw in (("chunked", {"chunks": (1, P, P, 3)}), ("contiguous", {}),
                         ("two_rows", {"chunks": (2, P, P, 3)}), ("gzip", {"chunks": (1, P, P, 3), "compression": "gzip"})):
            f.create_dataset(name, data=data, **kw)
        for name in f:
            out = np.zeros((len(rows), P, P, 3), np.uint8)
            read_rows(f[name], rows, out)
            np.testing.assert_array_equal(out, data[rows], err_msg=name)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_match_the_per_item_path(root, workers):
    ds = ShardDataset(root, niche_spots=4)

    class PerItem(torch.utils.data.Dataset):  # today's path: one __getitem__ per spot, then collate
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return ds[i]

    def batches(d, w):
        dl = torch.utils.data.DataLoader(d, batch_size=5, shuffle=True, drop_last=True, collate_fn=collate,
                                         num_workers=w, generator=torch.Generator().manual_seed(3))
        return list(dl)

    new, old = batches(ds, workers), batches(PerItem(), 0)
    assert len(new) == len(old) == 4
    for a, b in zip(new, old):
        _same(a, b)
