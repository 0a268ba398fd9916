"""stalign with the original SToFM as its niche gene encoder: a ``stofm convert`` folder of the fixture weights (or
``stofm-original``) inside a stalign model trains on the CPU, survives a checkpoint, and SE2Niche feeds it the
distance matrix the original pipeline builds for the same coordinates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import stalign
from stalign.training.losses import ThreeTargetLoss

FIX = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "stofm_original"
SE2 = FIX / "se2"
needs_fixture = pytest.mark.skipif(not (SE2 / "state_dict.safetensors").is_file(),
                                   reason=f"golden fixtures of the original SToFM not found at {FIX} (a user's checkout)")
G, M, V = 10, 6, 3
GENES = [f"g{i}" for i in range(G)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    from safetensors.numpy import load_file

    from stofm.cli import main

    out = tmp_path_factory.mktemp("conv") / "stofm"
    assert main(["convert", str(SE2 / "state_dict.safetensors"), "--config", str(SE2 / "config.json"),
                 "--out", str(out)]) == 0
    assert load_file(str(out / "model.safetensors"))  # the original key names, as released
    return out


def _batch(b: int = 4, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, M, generator=g) > 0.3
    mask[:, 0] = True
    return {"spot_image": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
            "niche_image": torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=g),
            "spot_expr": torch.rand(b, G, generator=g) * 3, "niche_expr": torch.rand(b, G, generator=g) * 3,
            "niche_spot_expr": torch.rand(b, M, G, generator=g) * 3,
            "niche_spot_coords": 3000 + torch.rand(b, M, 2, generator=g) * 300, "niche_spot_mask": mask,
            "stofm_units_per_um": torch.full((b,), 0.015),
            "virtual_expr": torch.rand(b, V, G, generator=g) * 3,
            "virtual_coords": torch.rand(b, V, 2, generator=g) * 6000, "virtual_mask": torch.ones(b, V, dtype=torch.bool)}


def _model(folder: Path | str):
    torch.manual_seed(0)
    return stalign.create_model("stalign-tiny", genes=GENES, share_image_encoder=True, dropout=0.0,
                                gene={"encoder": "stofm", "niche": "se2", "encoder_kwargs": {
                                    "model": str(folder), "cell_encoder_cfg": {"kind": "mlp", "hidden": 32, "depth": 1}}})


@needs_fixture
def test_stalign_with_the_converted_original_trains_on_cpu(converted, tmp_path):
    from safetensors.numpy import load_file

    from stalign.models.factory import save_checkpoint

    model = _model(converted)
    se2 = model.niche_gene_encoder.se2
    assert se2.arch == "original" and se2.model.config.num_attention_heads == 32
    want = load_file(str(SE2 / "state_dict.safetensors"))
    for k, v in se2.model.state_dict().items():  # the converted weights, unchanged
        np.testing.assert_array_equal(v.numpy(), want[k])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn, losses = ThreeTargetLoss(), []
    model.train()
    for step in range(3):
        out = model(_batch(seed=step))
        loss = loss_fn(out)["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert se2.model.encoder.layers[1].self_attn.k_proj.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(float(loss.detach()))
    assert not np.allclose(se2.model.embedding_layer.weight.detach().numpy(), want["embedding_layer.weight"])
    loaded = stalign.load_checkpoint(save_checkpoint(model, tmp_path / "ckpt")).eval()
    with torch.no_grad():
        a, b = model.eval().encode_niche_gene(_batch(seed=9)), loaded.encode_niche_gene(_batch(seed=9))
    torch.testing.assert_close(a, b)


def test_stalign_with_stofm_original_tiny_trains():
    """The config name works without any fixture: every trainable weight of the original SE(2) gets a gradient."""
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=GENES, share_image_encoder=True,
                                 gene={"encoder": "stofm", "niche": "se2", "encoder_kwargs": {"model": "stofm-original-tiny"}})
    ThreeTargetLoss()(model.train()(_batch()))["loss"].backward()
    se2 = model.niche_gene_encoder.se2
    assert se2.arch == "original"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in se2.parameters())


def test_se2_niche_feeds_the_original_distance_matrix():
    """With the slide's bounding-box frame in the batch, the distance matrix SE2Niche hands the original SE(2) equals
    stofm.original.pipeline.distance_matrix of the same spots and virtual cells normalised as the original does."""
    from stalign.models.gene_encoders import SE2Niche
    from stofm.cell_encoder import MLPCellEncoder
    from stofm.original.pipeline import distance_matrix, normalize_coords
    from stofm.original.se2 import OriginalArchSE2
    from stofm.util.geometry import bbox_center, bbox_units_per_um

    rng = np.random.default_rng(0)
    slide = rng.uniform(0, [5000, 3000], size=(300, 2))
    virtual = np.stack([slide[i::V].mean(0) for i in range(V)])
    se2 = OriginalArchSE2(dim=8, depth=1, heads=2, in_dim=4)
    seen = {}
    forward = se2.model.forward

    def record(feats, dist, types, **kw):
        seen["dist"], seen["types"] = dist, types
        return forward(feats, dist, types, **kw)

    se2.model.forward = record
    niche = SE2Niche(cell_encoder=MLPCellEncoder(genes=GENES, hidden=4, depth=1, out_dim=4), se2=se2)
    rows = [np.argsort(((slide - slide[i]) ** 2).sum(1))[:M] for i in (3, 150)]
    batch = {"niche_spot_expr": torch.rand(2, M, G), "niche_spot_coords": torch.from_numpy(slide[rows]).float(),
             "niche_spot_mask": torch.ones(2, M, dtype=torch.bool),
             "virtual_expr": torch.rand(2, V, G), "virtual_coords": torch.from_numpy(virtual).float().expand(2, -1, -1),
             "stofm_units_per_um": torch.full((2,), 0.02),
             "stofm_bbox_units_per_um": torch.full((2,), bbox_units_per_um(slide)),
             "stofm_bbox_center_um": torch.from_numpy(bbox_center(slide)).float().expand(2, -1)}
    niche(batch)
    norm = normalize_coords(slide)
    vnorm = (virtual - bbox_center(slide)) * bbox_units_per_um(slide)
    for b, idx in enumerate(rows):
        nodes = np.concatenate([np.zeros((1, 2)), vnorm, norm[idx]])
        np.testing.assert_allclose(seen["dist"][b].numpy(), distance_matrix(nodes, V), atol=2e-3, rtol=1e-4)
    assert seen["types"][0].tolist() == [1] + [2] * V + [0] * M
