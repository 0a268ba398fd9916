"""SE(2) transformer: invariance to rotation/translation, permutation equivariance, no leaks from padding/masks."""
from __future__ import annotations

import math

import pytest
import torch

from stofm.se2 import SE2Transformer


def _model(**kw) -> SE2Transformer:
    torch.manual_seed(0)
    cfg = dict(dim=32, depth=2, heads=4, n_gaussians=16, k_neighbors=6, far_distance=200.0, dropout=0.0)
    cfg.update(kw)
    return SE2Transformer(**cfg).eval()


def _inputs(b: int = 2, n: int = 40, v: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, 32, generator=g), torch.rand(b, n, 2, generator=g) * 30,
            torch.randn(b, v, 32, generator=g), torch.rand(b, v, 2, generator=g) * 30)


def _rigid(xy: torch.Tensor, angle: float, shift: tuple[float, float]) -> torch.Tensor:
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return xy @ rot.T + torch.tensor(shift)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_rotation_translation_invariance(impl):
    model = _model(attn_impl=impl)
    emb, xy, vemb, vxy = _inputs()
    with torch.no_grad():
        ref = model(emb, xy, None, vemb, vxy, return_pair=impl == "manual")
        for angle, shift in [(0.7, (13.0, -4.0)), (math.pi, (-100.0, 250.0)), (2.1, (0.0, 0.0))]:
            out = model(emb, _rigid(xy, angle, shift), None, vemb, _rigid(vxy, angle, shift),
                        return_pair=impl == "manual")
            for key in ("cls", "cells", "virtual"):
                assert torch.allclose(out[key], ref[key], atol=1e-4), (key, angle)
    # a non-rigid change (scaling) must change the output, so the test can fail
    with torch.no_grad():
        assert not torch.allclose(model(emb, xy * 2, None, vemb, vxy * 2)["cells"], ref["cells"], atol=1e-3)


def test_manual_and_sdpa_paths_agree():
    model = _model(attn_impl="manual")
    emb, xy, vemb, vxy = _inputs()
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[1, 30:] = True
    with torch.no_grad():
        a = model(emb, xy, pad, vemb, vxy)
        model.set_attn_impl("sdpa")
        b = model(emb, xy, pad, vemb, vxy, return_pair=False)  # last layer through the fused kernel
    assert b["pair"] is None and torch.isfinite(a["pair"]).all()
    assert torch.allclose(a["cells"][~pad], b["cells"][~pad], atol=1e-5)
    assert torch.allclose(a["cls"], b["cls"], atol=1e-5)


def test_permuting_cells_permutes_outputs():
    model = _model()
    emb, xy, vemb, vxy = _inputs()
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(emb, xy, None, vemb, vxy)
        out = model(emb[:, perm], xy[:, perm], None, vemb, vxy)
    assert torch.allclose(out["cells"], ref["cells"][:, perm], atol=1e-5)
    assert torch.allclose(out["cls"], ref["cls"], atol=1e-5)
    assert torch.equal(out["cell_graph"], ref["cell_graph"][:, perm][:, :, perm])


def test_padding_does_not_leak():
    model = _model()
    emb, xy, vemb, vxy = _inputs()
    pad = torch.zeros(2, 40, dtype=torch.bool)
    pad[0, 25:] = True
    vpad = torch.zeros(2, 5, dtype=torch.bool)
    vpad[0, 3:] = True
    with torch.no_grad():
        ref = model(emb, xy, pad, vemb, vxy, vpad)
        emb2, xy2, vemb2, vxy2 = emb.clone(), xy.clone(), vemb.clone(), vxy.clone()
        emb2[0, 25:] = 1e3 * torch.randn(15, 32)
        xy2[0, 25:] = float("nan")  # padded coordinates are never read
        vemb2[0, 3:] = -7.0
        vxy2[0, 3:] = 1e4
        out = model(emb2, xy2, pad, vemb2, vxy2, vpad)
        alone = model(emb[:1, :25], xy[:1, :25], None, vemb[:1, :3], vxy[:1, :3])
    assert torch.allclose(out["cells"][0, :25], ref["cells"][0, :25], atol=1e-5)
    assert torch.allclose(out["cls"], ref["cls"], atol=1e-5)
    assert torch.allclose(out["cells"][1], ref["cells"][1], atol=1e-5)  # other sample untouched
    # a padded sub-slice gives what the same sub-slice gives unpadded
    assert torch.allclose(alone["cells"][0], ref["cells"][0, :25], atol=1e-4)
    assert torch.allclose(alone["cls"][0], ref["cls"][0], atol=1e-4)


def test_masked_cells_do_not_leak():
    model = _model()
    emb, xy, vemb, vxy = _inputs()
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[:, ::7] = True
    with torch.no_grad():
        ref = model(emb, xy, None, vemb, vxy, mask=mask)
        emb2 = emb.clone()
        emb2[mask] = torch.randn(int(mask.sum()), 32) * 50
        out = model(emb2, xy, None, vemb, vxy, mask=mask)
        unmasked = model(emb2, xy, None, vemb, vxy)
    assert torch.allclose(out["cells"], ref["cells"], atol=1e-5)
    assert not torch.allclose(unmasked["cells"], ref["cells"], atol=1e-3)


def test_fewer_cells_than_k_and_gradients():
    model = _model(k_neighbors=50)
    emb, xy, vemb, vxy = _inputs(n=7)
    model.train()
    out = model(emb, xy, None, vemb, vxy)
    assert out["cells"].shape == (2, 7, 32) and out["pair"].shape == (2, 13, 13, 4)
    assert out["cell_graph"].all()  # k clipped to the cell count: everyone is a neighbour
    out["cls"].sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "mask_token")


def test_knn_graph_keeps_k_nearest_and_ties():
    model = _model(k_neighbors=4)
    grid = torch.stack(torch.meshgrid(torch.arange(5.0), torch.arange(5.0), indexing="ij"), -1).reshape(1, 25, 2)
    out = model(torch.randn(1, 25, 32), grid)
    centre = 12  # interior grid point: 4 neighbours at distance 1 (plus itself)
    assert int(out["cell_graph"][0, centre].sum()) == 5
    assert torch.equal(out["cell_graph"], out["cell_graph"].transpose(1, 2))


def test_nan_coordinates_raise():
    model = _model()
    emb, xy, vemb, vxy = _inputs()
    xy[0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model(emb, xy, None, vemb, vxy)
