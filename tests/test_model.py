"""STAlign end to end on tiny configs: every encoder kind trains (gradients everywhere, no NaN), outputs are
unit vectors, image-only inference, gene-panel errors, checkpoints round-trip."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import stalign
from stalign.models.factory import save_checkpoint
from stalign.models.stalign_model import GenePanelMismatchError
from stalign.training.data import slide_virtual_cells
from stalign.training.losses import ThreeTargetLoss

G, M = 12, 5
FEATURES = ("spot_image_features", "spot_gene_features", "niche_image_features", "niche_gene_features",
            "fused_spot_features", "fused_niche_features")
SMALL_VIT = {"embed_dim": 96, "depth": 1, "num_heads": 2, "img_size": 28}
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32},
             "text_cfg": {"width": 32, "heads": 2, "layers": 1, "vocab_size": 64}}


def make_batch(b: int = 4, g: int = G, size: int = 32, seed: int = 0, virtual: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, M, generator=gen) > 0.4
    mask[:, 0] = True  # the spot itself
    batch = {
        "spot_image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen),
        "niche_image": torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen),
        "spot_expr": torch.rand(b, g, generator=gen) * 3, "niche_expr": torch.rand(b, g, generator=gen) * 3,
        "niche_spot_expr": torch.rand(b, M, g, generator=gen) * 3,
        "niche_spot_coords": torch.rand(b, M, 2, generator=gen) * 200, "niche_spot_mask": mask,
        "coords_um": torch.rand(b, 2, generator=gen) * 1000, "slide_idx": torch.zeros(b, dtype=torch.long),
        "index": torch.arange(b), "stofm_units_per_um": torch.full((b,), 0.015),  # as ShardDataset: a 6.7 mm slide
    }
    if virtual:
        batch["virtual_expr"] = torch.rand(b, 3, g, generator=gen) * 3
        batch["virtual_coords"] = torch.rand(b, 3, 2, generator=gen) * 400
    return batch


def check_trains(model, batch: dict, loss=None) -> dict:
    """One forward/backward: unit-norm outputs, finite loss, every trainable parameter gets a finite, non-zero gradient."""
    model.train()
    out = model(batch)
    for k in FEATURES:
        assert out[k].shape == (batch["spot_expr"].shape[0], model.config.embed_dim), k
        assert torch.allclose(out[k].norm(dim=-1), torch.ones(out[k].shape[0]), atol=1e-5), k
    losses = (loss or ThreeTargetLoss())(out)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    bad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, bad[:10]
    # LoRA's A gets a zero gradient while B is still zero (its initialisation): B must move first
    zero = [n for n, p in trainable if p.grad.abs().sum() == 0 and not n.endswith("lora_a")]
    assert not zero, zero[:10]
    return out


IMAGE_KINDS = {
    "timm-vit": {"spec": "timm:test_vit", "kwargs": {"img_size": 32}},
    "timm-cnn": {"spec": "timm:test_resnet", "kwargs": {"input_size": 32, "zero_init_last": False}},
    "open_clip": {"spec": "open_clip:ViT-B-32", "kwargs": TINY_CLIP},
    "uni": {"spec": "uni", "kwargs": {"embed_dim": 64, "depth": 1, "num_heads": 2, "img_size": 32}},
    "virchow2": {"spec": "virchow2", "kwargs": SMALL_VIT},
    "h-optimus-0": {"spec": "h-optimus-0", "kwargs": SMALL_VIT},
    "conch": {"spec": "conch", "kwargs": {"width": 64, "depth": 1, "heads": 2, "image_size": 32, "embed_dim": 32,
                                          "pool_heads": 4}},
    "phikon": {"spec": "phikon", "kwargs": {"embed_dim": 64, "depth": 1, "img_size": 32}},
    "vit-lora": {"spec": "timm:test_vit", "kwargs": {"img_size": 32}, "lora_rank": 2},
    "vit-last-block": {"spec": "timm:test_vit", "kwargs": {"img_size": 32}, "unfreeze_last": 1},
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_every_image_encoder_kind_trains(kind: str) -> None:
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", n_genes=G, image=IMAGE_KINDS[kind], share_image_encoder=True)
    check_trains(model, make_batch())


def test_efficientnet_lite0_pretrained_trains(fetched) -> None:
    path = fetched("efficientnet-lite0") / "efficientnet-lite0-57934424.pth"
    model = stalign.create_model("stalign-tiny", n_genes=G, share_image_encoder=True,
                                 image={"spec": "efficientnet-lite0", "pretrained": str(path), "unfreeze_last": 1,
                                        "kwargs": {"input_size": 64}})
    frozen = [n for n, p in model.spot_image_encoder.named_parameters() if not p.requires_grad]
    assert any(n.startswith("trunk.blocks.0.") for n in frozen)
    check_trains(model.eval(), make_batch(b=3))  # eval: BatchNorm keeps ImageNet statistics


GENE_KINDS = {
    "mlp-pool": {"encoder": "mlp", "niche": "pool"},
    "mlp-mean_expr": {"encoder": "mlp", "niche": "mean_expr"},
    "mlp-se2": {"encoder": "mlp", "niche": "se2", "niche_kwargs": {"dim": 32, "depth": 2, "heads": 4,
                                                                   "n_gaussians": 8, "k_neighbors": 3}},
    "stofm-se2": {"encoder": "stofm", "encoder_kwargs": {"model": "stofm-tiny"}, "niche": "se2"},
}


@pytest.mark.parametrize("kind", sorted(GENE_KINDS))
def test_every_gene_encoder_kind_trains(kind: str) -> None:
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", n_genes=G, gene=GENE_KINDS[kind])
    check_trains(model, make_batch(virtual="se2" in kind))


def test_siglip_variant_trains() -> None:
    model = stalign.create_model("stalign-tiny", n_genes=G, siglip=True)
    out = check_trains(model, make_batch(), loss=ThreeTargetLoss(kind="siglip"))
    assert out["logit_bias"].item() == pytest.approx(-10.0)


def test_logit_scale_starts_at_inverse_temperature_and_is_clamped() -> None:
    model = stalign.create_model("stalign-tiny", n_genes=G)
    assert model.scale().item() == pytest.approx(10.0)
    with torch.no_grad():
        model.logit_scale.fill_(20.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_image_only_inference_matches_the_training_features() -> None:
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", n_genes=G).eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch)
        assert torch.allclose(model.encode_spot_image(batch["spot_image"]), out["spot_image_features"], atol=1e-6)
        assert torch.allclose(model.encode_niche_image(batch["niche_image"]), out["niche_image_features"], atol=1e-6)
        assert torch.allclose(model.encode_spot_gene(batch["spot_expr"]), out["spot_gene_features"], atol=1e-6)
        img = model.encode_image(batch["spot_image"], batch["niche_image"])
        gene = model.encode_gene(batch)
        want = torch.nn.functional.normalize(out["spot_image_features"] + out["niche_image_features"], dim=-1)
        assert torch.allclose(img, want, atol=1e-6)
        assert gene.shape == img.shape and torch.allclose(gene.norm(dim=-1), torch.ones(4), atol=1e-5)
        only_spot = model.encode_image(batch["spot_image"], batch["niche_image"], niche_weight=0.0)
        assert torch.allclose(only_spot, out["spot_image_features"], atol=1e-6)


def test_gene_panel_and_batch_errors() -> None:
    model = stalign.create_model("stalign-tiny", genes=[f"g{i}" for i in range(G)])
    with pytest.raises(GenePanelMismatchError, match="13 genes"):
        model(make_batch(g=G + 1))
    with pytest.raises(GenePanelMismatchError, match="missing"):
        model.check_genes([f"g{i}" for i in range(1, G + 1)], source="shards")
    with pytest.raises(GenePanelMismatchError, match="another order"):
        model.check_genes([f"g{i}" for i in reversed(range(G))])
    model.check_genes([f"g{i}" for i in range(G)])
    with pytest.raises(ValueError, match="empty batch"):
        model({k: v[:0] for k, v in make_batch().items()})
    bad = make_batch()
    bad["spot_expr"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(bad)
    with pytest.raises(KeyError, match="niche_image"):
        model({k: v for k, v in make_batch().items() if k != "niche_image"})


def test_unknown_names_and_keys() -> None:
    with pytest.raises(ValueError, match="stalign-tiny"):
        stalign.create_model("stalign-huge", n_genes=G)
    with pytest.raises(ValueError, match="unknown STAlign config keys"):
        stalign.create_model("stalign-tiny", n_genes=G, token_width=3)
    with pytest.raises(ValueError, match="known: .*uni"):
        stalign.create_model("stalign-tiny", n_genes=G, image={"spec": "no-such-net"})
    with pytest.raises(ValueError, match="genes"):
        stalign.create_model("stalign-tiny")
    assert {"stalign-tiny", "stalign-demo", "stalign-base"} <= set(stalign.list_models())


def test_shipped_configs_parse() -> None:
    from stalign.models.factory import model_config
    from stalign.models.stalign_model import STAlignConfig

    for name in stalign.list_models():
        cfg = STAlignConfig.from_dict(model_config(name))
        assert cfg.embed_dim > 0 and cfg.token_dim % cfg.heads == 0, name
    base = STAlignConfig.from_dict(model_config("stalign-base"))
    assert (base.tokens, base.token_dim, base.heads, base.init_temperature) == (8, 512, 8, 0.1)  # ST-Align's code
    assert base.gene.encoder == "stofm" and base.gene.niche == "se2"


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    genes = [f"g{i}" for i in range(G)]
    model = stalign.create_model("stalign-tiny", genes=genes, embed_dim=16, spot_image={"lora_rank": 2})
    with torch.no_grad():  # move away from the initialisation so a fresh model would differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    assert meta["name"] == "stalign-tiny" and meta["genes"] == genes and meta["overrides"]["embed_dim"] == 16
    loaded = stalign.load_checkpoint(folder)
    batch = make_batch()
    model.eval(), loaded.eval()
    with torch.no_grad():
        a, b = model(batch), loaded(batch)
    for k in FEATURES + ("logit_scale",):
        assert torch.equal(a[k], b[k]), k
    again = stalign.create_model(folder, genes=genes)  # a checkpoint folder works as a name
    assert again.genes == genes
    with pytest.raises(GenePanelMismatchError):
        stalign.create_model(folder, genes=genes[::-1])
    fresh = stalign.create_model("stalign-tiny", genes=genes, embed_dim=16, spot_image={"lora_rank": 2},
                                 pretrained=folder)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(batch)["fused_spot_features"], a["fused_spot_features"])
    with pytest.raises(ValueError, match="do not fit"):
        stalign.create_model("stalign-tiny", genes=genes, pretrained=folder)  # embed_dim 32 != 16


def test_pretrained_backbone_file_goes_to_both_image_encoders(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    ref = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32)
    f = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    model = stalign.create_model("stalign-tiny", n_genes=G, image={"spec": "timm:test_vit", "kwargs": {"img_size": 32}},
                                 pretrained=f)
    for enc in (model.spot_image_encoder, model.niche_image_encoder):
        assert torch.equal(enc.trunk.patch_embed.proj.weight, ref.patch_embed.proj.weight)
    assert model.meta["overrides"]["image"]["pretrained"] == str(f)


def test_real_shard_batch_with_virtual_cells_trains(small_shards) -> None:
    """A ShardDataset batch of the real Visium crop (+ the slide's virtual cells) through the SToFM gene path."""
    from stalign.data.dataset import ShardDataset, collate

    ds = ShardDataset(small_shards("squidpy"), niche_spots=8)
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=ds.genes, share_image_encoder=True,
                                 gene={"encoder": "stofm", "encoder_kwargs": {"model": "stofm-tiny"}, "niche": "se2"})
    batch = collate([ds[i] for i in range(6)])
    vexpr, vxy = slide_virtual_cells(ds, 0, 4)
    batch["virtual_expr"] = torch.from_numpy(vexpr)[None].expand(6, -1, -1)
    batch["virtual_coords"] = torch.from_numpy(vxy)[None].expand(6, -1, -1)
    batch["virtual_mask"] = torch.ones(6, vexpr.shape[0], dtype=torch.bool)
    assert batch["spot_image"].dtype == torch.uint8
    out = check_trains(model, batch)
    with torch.no_grad():  # the virtual cells enter the niche gene embedding
        model.eval()
        with_v = model.encode_niche_gene(batch)
        without = model.encode_niche_gene({k: v for k, v in batch.items() if not k.startswith("virtual_")})
    assert not torch.allclose(with_v, without, atol=1e-4)
    assert out["niche_gene_features"].shape == (6, model.config.embed_dim)


def test_checkpoint_of_a_stofm_folder_model_loads_without_the_folder(tmp_path: Path) -> None:
    import shutil

    import stofm

    genes = [f"g{i}" for i in range(G)]
    folder = stofm.create_model("stofm-tiny", genes=genes).save_pretrained(tmp_path / "stofm")
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=genes, gene={"encoder": "stofm", "niche": "se2",
                                                                    "encoder_kwargs": {"model": str(folder)}})
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    shutil.rmtree(folder)  # e.g. the checkpoint was copied to another machine
    loaded = stalign.load_checkpoint(ckpt).eval()
    batch = make_batch(virtual=True)
    with torch.no_grad():
        a, b = model.eval()(batch), loaded(batch)
    assert torch.equal(a["niche_gene_features"], b["niche_gene_features"])


def test_frozen_pretrained_stofm_gene_side_does_not_train(tmp_path: Path) -> None:
    """``encoder_kwargs.freeze``: a pretrained SToFM used as a fixed gene encoder (cell encoder and SE(2))."""
    import stofm

    genes = [f"g{i}" for i in range(G)]
    folder = stofm.create_model("stofm-tiny", genes=genes).save_pretrained(tmp_path / "stofm")
    model = stalign.create_model("stalign-tiny", genes=genes, gene={"encoder": "stofm", "niche": "se2",
                                                                    "encoder_kwargs": {"model": str(folder),
                                                                                       "freeze": True}})
    gene_side = [*model.spot_gene_encoder.parameters(), *model.niche_gene_encoder.parameters()]
    assert gene_side and not any(p.requires_grad for p in gene_side)
    check_trains(model, make_batch(virtual=True))  # everything else gets gradients
    assert all(p.grad is None for p in gene_side)
    loaded = stalign.load_checkpoint(save_checkpoint(model, tmp_path / "ckpt"))
    assert not any(p.requires_grad for p in loaded.spot_gene_encoder.parameters())


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    batch = make_batch()
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = stalign.create_model("stalign-tiny", n_genes=G, dropout=0.0).eval()
        model.set_grad_checkpointing(enable)
        ThreeTargetLoss()(model(batch))["loss"].backward()
        grads.append(model.spot_image_encoder.trunk.blocks[0].attn.qkv.weight.grad.clone())
    assert model.spot_image_encoder.trunk.grad_checkpointing
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_checkpoint_of_stalign_demo_reloads(tmp_path: Path, fetched) -> None:
    """One BatchNorm image encoder shared by spot and niche: safetensors stores it once, and BatchNorm fills in
    ``num_batches_tracked`` of the other name itself, which a strict safetensors load misreported as unexpected."""
    from safetensors.torch import load_file

    from stalign.models.factory import save_checkpoint

    fetched("efficientnet-lite0")
    model = stalign.create_model("stalign-demo", genes=[f"g{i}" for i in range(6)])
    assert model.niche_image_encoder is model.spot_image_encoder
    folder = save_checkpoint(model, tmp_path / "demo")
    loaded = stalign.load_checkpoint(folder).state_dict()
    stored = load_file(str(folder / "model.safetensors"))
    assert any("num_batches_tracked" in k for k in stored)
    for key, value in stored.items():
        assert torch.equal(loaded[key], value), key


def test_se2_niche_sees_the_distances_stofm_is_trained_on(small_shards):
    """One coordinate convention (stofm.util.geometry: slide diameter = 100 units): the distances SE2Niche feeds the
    SE(2) transformer for a niche equal those stofm.embed / pretraining feed for the same spots of the slide."""
    from stalign.data.dataset import ShardDataset, collate
    from stalign.models.gene_encoders import SE2Niche
    from stofm.cell_encoder import MLPCellEncoder
    from stofm.subslice import scale_to_diameter

    class Recorder(torch.nn.Module):
        dim = 8

        def forward(self, emb, coords, pad, *virtual):
            self.coords, self.pad = coords, pad
            return {"cls": torch.zeros(len(coords), self.dim)}

    ds = ShardDataset(small_shards("squidpy"), niche_spots=8)
    batch = collate([ds[i] for i in (0, 17, 30)])
    rec = Recorder()
    niche = SE2Niche(cell_encoder=MLPCellEncoder(genes=ds.genes, hidden=4, depth=1, out_dim=4), se2=rec)
    niche(batch)
    all_um = np.concatenate([ds.slide_spots(0)["coords_um"]])
    model_xy, _ = scale_to_diameter(all_um)  # what stofm.embed gives the model for this slide
    for row, i in enumerate((0, 17, 30)):
        nb = ds._arrays(0)["neighbors"][i][:8]
        got = torch.cdist(rec.coords[row], rec.coords[row]).numpy()
        want = np.linalg.norm(model_xy[nb][:, None] - model_xy[nb][None], axis=-1)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert 0.5 < float(batch["stofm_units_per_um"][0]) * 100 < 50  # ~1.x units per 100 µm spot pitch, not 35
    with pytest.raises(ValueError, match="coord_scale"):
        SE2Niche(cell_encoder=torch.nn.Identity(), se2=rec, coord_scale=0)
