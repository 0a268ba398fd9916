"""ShardDataset over two real-data shards: item contents, neighbours, DataLoader workers, splits."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from stalign.data import expression as ex
from stalign.data import shards
from stalign.data.dataset import ShardDataset, collate, split_indices
from stalign.training.data import slide_virtual_cells
from stofm.util.knn import neighbor_indices

P, NICHE_UM, UM_PER_PX = 32, 300.0, 1.0


@pytest.fixture(scope="module")
def root(tmp_path_factory, squidpy_crop):
    """Two shards from the real Visium crop: as is, and mirrored left-right (image and coordinates)."""
    import anndata as ad

    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    img = np.asarray(Image.open(squidpy_crop / "test_img.jpg").convert("RGB"))
    out = tmp_path_factory.mktemp("shards")
    genes = list(adata.var_names[:40])
    expr = adata[:, genes].X.toarray()
    entries = []
    for sid, image, xy in (("crop", img, adata.obsm["spatial"].astype(np.float64)),
                           ("mirror", img[:, ::-1], adata.obsm["spatial"] * [-1, 1] + [img.shape[1] - 1, 0])):
        pad = np.pad(image, ((P, P), (P, P), (0, 0)))
        cut = np.stack([pad[int(y) + P - P // 2:int(y) + P + P // 2, int(x) + P - P // 2:int(x) + P + P // 2]
                        for x, y in xy])
        um = xy * UM_PER_PX
        with shards.ShardWriter(out / shards.shard_relpath(sid), slide_id=sid, n_spots=len(xy), patch_px=P,
                                genes=genes, um_per_px=UM_PER_PX) as w:
            w.write_patches(0, cut, cut[:, ::2, ::2].repeat(2, 1).repeat(2, 2))
            w.finish(expr=expr, niche_expr=ex.niche_expression(expr, um, NICHE_UM), coords_px=xy,
                     coords_um=um, neighbors=neighbor_indices(um, 8), padded=np.zeros(len(xy), bool),
                     barcodes=list(adata.obs_names))
        entries.append({"slide_id": sid, "shard": shards.shard_relpath(sid), "n_spots": len(xy)})
    shards.write_manifest(out, {"format": shards.FORMAT, "version": shards.VERSION, "genes": genes,
                                "spot_um": P * UM_PER_PX, "niche_um": NICHE_UM, "patch_px": P, "slides": entries})
    return out


def test_item_contents_match_the_shard(root):
    ds = ShardDataset(root, niche_spots=12)
    assert len(ds) == 98 and ds.genes == shards.read_manifest(root)["genes"]
    data = shards.read_shard(root / "shards" / "mirror.h5", patches=True)
    item = ds[49 + 7]
    assert item["spot_image"].dtype == torch.uint8 and item["spot_image"].shape == (3, P, P)
    np.testing.assert_array_equal(item["spot_image"].numpy(), data["spot_patches"][7].transpose(2, 0, 1))
    np.testing.assert_array_equal(item["niche_image"].numpy(), data["niche_patches"][7].transpose(2, 0, 1))
    np.testing.assert_array_equal(item["spot_expr"].numpy(), data["expr"][7])
    np.testing.assert_array_equal(item["niche_expr"].numpy(), data["niche_expr"][7])
    assert int(item["slide_idx"]) == 1 and int(item["index"]) == 56 and ds.slide_of(56) == 1
    # neighbours: 8 stored, padded to 12 with a False mask; self first; mask = inside the niche square
    nb = data["neighbors"][7]
    assert nb[0] == 7 and item["niche_spot_expr"].shape == (12, 40) and item["niche_spot_coords"].shape == (12, 2)
    np.testing.assert_array_equal(item["niche_spot_expr"][:8].numpy(), data["expr"][nb])
    np.testing.assert_allclose(item["niche_spot_coords"][:8].numpy(), data["coords_um"][nb])
    inside = np.all(np.abs(data["coords_um"][nb] - data["coords_um"][7]) <= NICHE_UM / 2, axis=1)
    assert item["niche_spot_mask"][:8].tolist() == inside.tolist() and 1 < inside.sum() < 8
    assert not item["niche_spot_mask"][8:].any() and (item["niche_spot_expr"][8:] == 0).all()
    # the niche mean stored in the shard is the mean over the spots inside the niche square
    all_inside = np.all(np.abs(data["coords_um"] - data["coords_um"][7]) <= NICHE_UM / 2, axis=1)
    np.testing.assert_allclose(item["niche_expr"].numpy(), data["expr"][all_inside].mean(0), atol=2e-3)


def test_items_carry_both_stofm_frames_of_their_slide(root):
    """The project's frame (slide diameter = 100 units) and the original SToFM's (bounding-box diagonal = 100,
    origin at the box centre), each computed over the whole slide, so SE2Niche feeds either model its own units."""
    from stofm.util.geometry import bbox_center, bbox_units_per_um, units_per_um

    ds = ShardDataset(root)
    data = shards.read_shard(root / "shards" / "mirror.h5")
    item = ds[49 + 3]
    assert float(item["stofm_units_per_um"]) == pytest.approx(units_per_um(data["coords_um"]), rel=1e-6)
    assert float(item["stofm_bbox_units_per_um"]) == pytest.approx(bbox_units_per_um(data["coords_um"]), rel=1e-6)
    np.testing.assert_allclose(item["stofm_bbox_center_um"].numpy(), bbox_center(data["coords_um"]), rtol=1e-6)
    # the box's corners sit 50 units from its centre
    box = np.array([data["coords_um"].min(0), data["coords_um"].max(0)])
    half = (box - item["stofm_bbox_center_um"].numpy()) * float(item["stofm_bbox_units_per_um"])
    np.testing.assert_allclose(np.linalg.norm(half, axis=1), [50.0, 50.0], rtol=1e-5)


def test_transform_is_applied_to_both_images(root):
    ds = ShardDataset(root, transform=lambda x: x.float() / 255)
    item = ds[0]
    assert item["spot_image"].dtype == torch.float32 and float(item["niche_image"].max()) <= 1.0


def test_dataloader_with_two_workers_reads_every_spot_once(root):
    ds = ShardDataset(root)
    ds[0]  # an open handle in the parent must not leak into the forked workers
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, num_workers=2, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    index = torch.cat([b["index"] for b in batches])
    assert sorted(index.tolist()) == list(range(98))
    b = batches[0]
    assert b["spot_image"].shape[1:] == (3, P, P) and b["niche_spot_mask"].dtype == torch.bool
    expected = torch.stack([ds[int(i)]["spot_image"] for i in b["index"]])
    assert torch.equal(b["spot_image"], expected)
    expected_expr = torch.from_numpy(ds.expression_matrix()[b["index"].numpy()])
    assert torch.equal(b["spot_expr"], expected_expr)


def test_slide_and_index_selection(root):
    ds = ShardDataset(root, slides=["mirror"])
    assert len(ds) == 49 and int(ds[0]["index"]) == 49 and ds.slide_of(0) == 1
    sub = ShardDataset(root, indices=[3, 60, 5])
    assert [int(sub[i]["index"]) for i in range(3)] == [3, 60, 5]
    assert sub.slide_numbers().tolist() == [sub.slide_of(i) for i in range(3)] == [0, 1, 0]
    assert ds.slide_numbers().tolist() == [1] * 49
    full = ShardDataset(root).expression_matrix()
    np.testing.assert_array_equal(sub.expression_matrix(), full[[3, 60, 5]])
    with pytest.raises(IndexError, match="not spots of the selected slides"):
        ShardDataset(root, slides=[1], indices=[3])
    with pytest.raises(KeyError, match="'nope' is not in"):
        ShardDataset(root, slides=["nope"])
    with pytest.raises(IndexError):
        ds[49]


def test_virtual_cells_are_cluster_means(root):
    ds = ShardDataset(root)
    expr = ds.expression_matrix()[:49]
    xy = shards.read_shard(root / "shards" / "crop.h5")["coords_um"]
    one_expr, one_xy = slide_virtual_cells(ds, 0, 1)
    np.testing.assert_allclose(one_expr[0], expr.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one_xy[0], xy.mean(0), rtol=1e-5)
    v_expr, v_xy = slide_virtual_cells(ds, 0, 49)  # one spot per cluster
    order = np.lexsort(v_xy.T)
    np.testing.assert_allclose(v_xy[order], xy[np.lexsort(xy.T)])
    v_expr, v_xy = slide_virtual_cells(ds, 0, 6)
    assert v_expr.shape == (6, 40) and v_xy.shape == (6, 2)
    assert (v_xy.min(0) >= xy.min(0)).all() and (v_xy.max(0) <= xy.max(0)).all()
    # only the dataset's own spots feed the clusters (no leakage of held-out spots)
    sub = ShardDataset(root, indices=np.arange(10))
    np.testing.assert_allclose(slide_virtual_cells(sub, 0, 1)[1][0], xy[:10].mean(0), rtol=1e-5)


def test_split_indices_by_slide_and_by_spot(root):
    ds = ShardDataset(root)
    train, val = split_indices(ds, val_fraction=0.5, by="slide", seed=1)
    assert len(train) == len(val) == 49 and set(train.tolist()).isdisjoint(val.tolist())
    assert {ShardDataset(root, indices=val).slide_of(i) for i in range(49)} in ({0}, {1})
    train, val = split_indices(ds, val_fraction=0.2, by="spot", seed=1)
    assert len(val) == 20 and sorted(np.concatenate([train, val]).tolist()) == list(range(98))
    assert np.array_equal(val, split_indices(ds, val_fraction=0.2, by="spot", seed=1)[1])
    with pytest.raises(ValueError, match="at least two slides"):
        split_indices(ShardDataset(root, slides=[0]), val_fraction=0.5, by="slide")
    # blocks: no training spot within niche_um (in x or y) of a validation spot, on either slide
    train, val = split_indices(ds, val_fraction=0.3, by="block", seed=3)
    assert len(val) and len(train) and set(train.tolist()).isdisjoint(val.tolist())
    xy = np.concatenate([shards.read_shard(root / "shards" / f"{s}.h5")["coords_um"] for s in ("crop", "mirror")])
    for t in train:
        same_slide = val[(val >= 49) == (t >= 49)]
        assert np.all(np.abs(xy[same_slide] - xy[t]).max(1) >= NICHE_UM)
    with pytest.raises(ValueError, match="by must be"):
        split_indices(ds, val_fraction=0.5, by="patient")
