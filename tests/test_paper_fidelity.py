"""Fidelity to the published code (issue 24): with the original SToFM as the gene side, stalign's virtual cells are
the original's hypernodes (Leiden on 0.2 xy + 0.8 PCA2 of the cell embeddings, count free, mean cell embedding) as
stofm's own pipeline computes them; configs/paper.yaml uses ST-Align's optimiser (torch AdamW defaults, no
clipping, no augmentation, weight decay 0.04 -> 0.4 by a cosine, which the scheduler runs and resumes)."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import stalign
from stalign.data.dataset import ShardDataset, collate
from stalign.training.data import VirtualCellBank, original_cell_embedder

pytest.importorskip("igraph")  # Leiden (stalign[leiden])
ORIGINAL_GENE_SIDE = {"encoder": "stofm", "niche": "se2", "encoder_kwargs": {"model": "stofm-original-tiny"}}


def _original_model(genes):
    torch.manual_seed(0)
    return stalign.create_model("stalign-tiny", genes=genes, gene=ORIGINAL_GENE_SIDE)


def test_original_gene_side_virtual_cells_are_stofms_own(small_shards):
    import anndata

    from stofm import create_model
    from stofm.embedding import prepare_slide

    ds = ShardDataset(small_shards("squidpy"))
    model = _original_model(ds.genes)
    embed = original_cell_embedder(model)
    assert embed is not None and original_cell_embedder(stalign.create_model("stalign-tiny", genes=ds.genes)) is None
    bank = VirtualCellBank([ds], n_slides=1, n_virtual=8, seed=0, embed=embed)
    ours_emb, ours_xy = bank.values[0][bank.mask[0]].numpy(), bank.coords[0][bank.mask[0]].numpy()

    # stofm's own pipeline (stofm.embed's slide preparation) with the same cell encoder over the same spots
    spots = ds.slide_spots(0)
    sm = create_model("stofm-original-tiny", genes=ds.genes)
    sm.cell_encoder.load_state_dict(model.niche_gene_encoder.cell.encoder.state_dict())
    adata = anndata.AnnData(X=spots["expr"].astype(np.float32), obsm={"spatial": spots["coords_um"].astype(np.float64)})
    adata.var_names = ds.genes
    ref = prepare_slide(adata, sm.eval(), input_kind="log1p", seed=0)
    assert ref.info["cluster_method"] == "original"
    assert len(ours_emb) == len(ref.virtual_emb) != 8  # Leiden's count, not the configured 8
    np.testing.assert_allclose(ours_emb, ref.virtual_emb.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(normalize_coords_like(spots["coords_um"], ours_xy), ref.virtual_coords.numpy(),
                               rtol=1e-4, atol=1e-3)

    batch = bank.attach(collate([ds[i] for i in range(4)]))  # the niche encoder takes the given embeddings
    assert "virtual_emb" in batch and "virtual_expr" not in batch
    assert torch.isfinite(model(batch)["niche_gene_features"]).all()


def normalize_coords_like(spots_xy: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``xy`` in the bounding-box frame of ``spots_xy`` (the original's: centred, diagonal 100)."""
    lo, hi = spots_xy.min(0), spots_xy.max(0)
    return (xy - (hi + lo) / 2) / np.sqrt(((hi - lo) ** 2).sum()) * 100.0


def test_training_attaches_the_original_virtual_cells(small_shards, tmp_path, monkeypatch):
    from stalign.training import data as train_data
    from stalign.training.trainer import train_from_config

    keys = []
    attach = train_data.VirtualCellBank.attach
    monkeypatch.setattr(train_data.VirtualCellBank, "attach",
                        lambda self, batch: keys.append(self.key) or attach(self, batch))
    train_from_config("configs/tiny_test.yaml", data=str(small_shards("squidpy")), output_dir=str(tmp_path),
                      max_steps=1, batch_size=4, model_overrides={"gene": ORIGINAL_GENE_SIDE})
    assert keys and set(keys) == {"virtual_emb"}


def test_paper_config_uses_the_published_optimiser():
    from stalign.training.config import resolve_config

    cfg = resolve_config("paper")
    adamw = inspect.signature(torch.optim.AdamW).parameters
    assert tuple(cfg.betas) == tuple(adamw["betas"].default) and cfg.eps == adamw["eps"].default
    assert cfg.max_grad_norm == 0 and cfg.augment is False
    assert (cfg.weight_decay, cfg.weight_decay_end) == (0.04, 0.4)
    assert math.isclose(cfg.lr, 5e-4 * cfg.batch_size / 256) and math.isclose(cfg.lr * cfg.min_lr_ratio, 1e-6)


def test_weight_decay_follows_a_cosine_and_resumes():
    from stofm.util.optim import build_optimizer, build_scheduler

    def make():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
        opt = build_optimizer(net, lr=1e-3, weight_decay=0.04)
        return net, opt, build_scheduler(opt, warmup_steps=2, total_steps=10, weight_decay_end=0.4)

    def run(opt, sched, net, steps):
        seen = []
        for _ in range(steps):
            seen.append([g["weight_decay"] for g in opt.param_groups])  # what this optimizer step uses
            opt.zero_grad()
            net(torch.ones(1, 3)).sum().backward()
            opt.step()
            sched.step()
        return seen

    net, opt, sched = make()
    seen = run(opt, sched, net, 12)
    # DINO's cosine_scheduler(0.04, 0.4, ...) over 10 iterations, as ST-Align's wd_schedule; then the final value
    want = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / 10)) for i in range(10)] + [0.4, 0.4]
    np.testing.assert_allclose([s[0] for s in seen], want, rtol=1e-12)
    assert all(s[1] == 0.0 for s in seen)  # biases and norms: never decayed
    net, opt, sched = make()
    first = run(opt, sched, net, 4)
    net2, opt2, sched2 = make()  # a resumed run: the optimizer's and the scheduler's states
    net2.load_state_dict(net.state_dict())
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert [s[0] for s in first + run(opt2, sched2, net2, 8)] == [s[0] for s in seen]
    with pytest.raises(ValueError, match="weight_decay_end"):
        build_scheduler(opt2, warmup_steps=0, total_steps=5, weight_decay_end=-1.0)
