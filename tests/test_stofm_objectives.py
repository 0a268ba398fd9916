"""MCM and PDR: mask/noise statistics, loss definitions, and both losses falling on the real Visium crop."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stofm.objectives import (
    MCMLoss,
    PDRLoss,
    mcm_masks,
    mean_nn_spacing,
    perturb_coords,
)


def test_mcm_mask_ratios_and_padding():
    pad = torch.zeros(4, 2000, dtype=torch.bool)
    pad[1, 1000:] = True
    replace, target = mcm_masks(pad, generator=torch.Generator().manual_seed(0))
    assert not (replace & pad).any() and not (target & pad).any()
    assert (replace <= target).all()
    real = (~pad).sum().item()
    assert abs(replace.sum().item() / real - 0.12) < 0.015
    assert abs((target & ~replace).sum().item() / real - 0.03) < 0.01
    tiny = torch.tensor([[False, False, True, True]])  # 2 real cells: still one target
    r, t = mcm_masks(tiny, generator=torch.Generator().manual_seed(1))
    assert t.sum() >= 1 and not (t & tiny).any()


def test_pdr_noise_scale_and_ratio():
    grid = torch.stack(torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij"), -1).reshape(1, -1, 2)
    pad = torch.zeros(1, 1600, dtype=torch.bool)
    assert mean_nn_spacing(grid * 3, pad).item() == pytest.approx(3.0)
    noisy, moved = perturb_coords(grid * 3, pad, generator=torch.Generator().manual_seed(0))
    assert abs(moved.float().mean().item() - 0.15) < 0.03
    assert torch.equal(noisy[~moved], (grid * 3)[~moved])
    step = (noisy - grid * 3)[moved]
    assert step.std().item() == pytest.approx(15.0, rel=0.15)  # sigma = 5 x spacing


def test_losses_score_the_right_entries():
    pred = torch.randn(1, 3, 8)
    target = pred.clone()
    target[0, 1] = -pred[0, 1]  # opposite: cosine loss 2 where scored
    m = torch.tensor([[False, True, False]])
    assert MCMLoss()(pred, target, m)["mcm_loss"].item() == pytest.approx(2.0)
    assert MCMLoss()(pred, target, ~m)["mcm_loss"].item() == pytest.approx(0.0, abs=1e-6)
    coords = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]]])
    graph = torch.ones(1, 3, 3, dtype=torch.bool)
    pad = torch.zeros(1, 3, dtype=torch.bool)
    moved = torch.tensor([[False, False, True]])
    dpred = torch.zeros(1, 3, 3)
    # pairs (0,2),(1,2) and symmetric: distances 10 and 5 = 2 and 1 mean spacings (5) -> mean of 4, 1
    assert PDRLoss()(dpred, coords, moved, graph, pad)["pdr_loss"].item() == pytest.approx(2.5)
    assert PDRLoss()(dpred, coords * 7, moved, graph, pad)["pdr_loss"].item() == pytest.approx(2.5)


def _crop_batch(squidpy_crop, model):
    """Sub-slices of the real crop with informative cell embeddings: centred PCA-32 of the real log expression,
    L2-normalised (an untrained cell encoder's outputs share one direction, so predicting their mean would
    already give a low MCM loss)."""
    import dataclasses

    import anndata as ad
    import torch.nn.functional as F

    from stofm.embedding import collate_subslices, prepare_slide
    from stofm.virtual_cells import virtual_cells

    adata = ad.read_h5ad(squidpy_crop / "test_data.h5ad")
    slide = prepare_slide(adata, model, n_virtual=6, cells_per_tile=12, max_cells=16)
    X = torch.as_tensor(adata.X.toarray()).double()
    X = X - X.mean(0)
    emb = F.normalize((X @ torch.linalg.svd(X, full_matrices=False)[2][:32].T).float(), dim=-1)
    vxy, vemb, _ = virtual_cells(slide.coords.double(), emb, 6, seed=0)
    slide = dataclasses.replace(slide, cell_emb=emb, virtual_coords=vxy.float(), virtual_emb=vemb.float())
    return collate_subslices([(slide, t) for t in slide.tiles]), emb


def test_mcm_and_pdr_decrease_on_real_crop(squidpy_crop):
    import anndata as ad
    import torch.nn.functional as F

    from stofm.model import create_model
    from stofm.objectives import SToFMPretrainLoss

    genes = list(ad.read_h5ad(squidpy_crop / "test_data.h5ad", backed="r").var_names)
    torch.manual_seed(0)
    model = create_model("stofm-tiny", genes=genes, cell_encoder_cfg={"out_dim": 32})
    batch, emb = _crop_batch(squidpy_crop, model)
    assert batch["cell_emb"].shape[0] >= 3 and batch["pad_mask"].any()  # several padded sub-slices
    loss_fn = SToFMPretrainLoss()
    params = [p for n, p in model.named_parameters() if not n.startswith("cell_encoder.")]
    opt = torch.optim.AdamW(params, lr=3e-3)

    def evaluate() -> dict:
        model.eval()
        with torch.no_grad():
            res = [loss_fn(model.pretrain_forward(batch, generator=torch.Generator().manual_seed(100 + s)), batch)
                   for s in range(4)]
        model.train()
        return {k: float(np.mean([r[k].item() for r in res])) for k in ("mcm_loss", "pdr_loss")}

    before = evaluate()
    for step in range(40):
        out = model.pretrain_forward(batch, generator=torch.Generator().manual_seed(step))
        loss = loss_fn(out, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after["mcm_loss"] < 0.9 * before["mcm_loss"], (before, after)
    assert after["pdr_loss"] < 0.5 * before["pdr_loss"], (before, after)
    # the masked cells are predicted from their context, better than by the slide's mean embedding
    mean_baseline = float((1 - F.cosine_similarity(emb, emb.mean(0, keepdim=True))).mean())
    assert after["mcm_loss"] < 0.95 * mean_baseline, (after, mean_baseline)
