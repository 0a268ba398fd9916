"""ThreeTargetLoss against hand-computed numpy values; hard negatives; SigLIP; bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stalign.training.losses import EmptyBatchError, NonFiniteLossError, ThreeTargetLoss

PAIRS = {"spot_loss": ("spot_image_features", "spot_gene_features"),
         "niche_loss": ("niche_image_features", "niche_gene_features"),
         "fusion_loss": ("fused_spot_features", "fused_niche_features")}


def _unit(rng: np.random.Generator, n: int, e: int) -> np.ndarray:
    x = rng.normal(size=(n, e))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _out(feats: dict[str, np.ndarray], scale: float, bias: float | None = None) -> dict[str, torch.Tensor]:
    out = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in feats.items()}
    out["logit_scale"] = torch.tensor(scale, dtype=torch.float64)
    if bias is not None:
        out["logit_bias"] = torch.tensor(bias, dtype=torch.float64)
    return out


def _feats(seed: int = 0, n: int = 3, e: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: _unit(rng, n, e) for pair in PAIRS.values() for k in pair}


def _ce_rows(logits: np.ndarray, exclude: np.ndarray | None = None) -> float:
    """Mean over rows of -log softmax(logits)[i, i], written out with exp/log (excluded entries dropped)."""
    losses = []
    for i, row in enumerate(logits):
        keep = np.ones(len(row), bool) if exclude is None else ~exclude[i] | (np.arange(len(row)) == i)
        losses.append(-(row[i] - np.log(np.exp(row[keep]).sum())))
    return float(np.mean(losses))


def test_infonce_equals_hand_computed_value() -> None:
    feats, scale = _feats(), 10.0
    expected = {}
    for name, (ka, kb) in PAIRS.items():
        logits = scale * feats[ka] @ feats[kb].T
        expected[name] = 0.5 * (_ce_rows(logits) + _ce_rows(logits.T))
    expected["loss"] = 0.3 * expected["spot_loss"] + 0.3 * expected["niche_loss"] + 0.4 * expected["fusion_loss"]
    got = ThreeTargetLoss()(_out(feats, scale))
    for k, v in expected.items():
        assert got[k].item() == pytest.approx(v, rel=1e-10), k
    # a concrete number for the spot term, so a shared error in both computations cannot hide
    a, b = feats["spot_image_features"], feats["spot_gene_features"]
    s = scale * a @ b.T
    first_row = -s[0, 0] + np.log(np.exp(s[0, 0]) + np.exp(s[0, 1]) + np.exp(s[0, 2]))
    assert _ce_rows(s) == pytest.approx(np.mean([first_row] + [-s[i, i] + np.log(np.exp(s[i]).sum()) for i in (1, 2)]))


def test_weights_alpha_beta() -> None:
    out = _out(_feats(1), 5.0)
    got = ThreeTargetLoss(alpha=0.5, beta=0.2)(out)
    want = 0.5 * got["spot_loss"] + 0.2 * got["niche_loss"] + 0.3 * got["fusion_loss"]
    assert got["loss"].item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="alpha"):
        ThreeTargetLoss(alpha=0.8, beta=0.5)


def test_aligned_pairs_give_lower_loss_than_shuffled() -> None:
    feats = _feats(2, n=8, e=16)
    aligned = {k: feats[pair[0]] for pair in PAIRS.values() for k in pair}
    assert ThreeTargetLoss()(_out(aligned, 10.0))["loss"] < ThreeTargetLoss()(_out(feats, 10.0))["loss"]


def test_hard_negative_mask_drops_same_cluster_pairs_of_the_same_slide() -> None:
    feats, scale = _feats(3, n=5, e=4), 10.0
    cluster = np.array([0, 0, 1, 1, 0])
    slide = np.array([0, 0, 0, 0, 1])  # spot 4 shares cluster 0 but lies on another slide: stays a negative
    exclude = (cluster[:, None] == cluster[None, :]) & (slide[:, None] == slide[None, :])
    a, b = feats["spot_image_features"], feats["spot_gene_features"]
    logits = scale * a @ b.T
    want = 0.5 * (_ce_rows(logits, exclude) + _ce_rows(logits.T, exclude.T))
    got = ThreeTargetLoss()(_out(feats, scale), cluster=torch.tensor(cluster), slide_idx=torch.tensor(slide))
    assert got["spot_loss"].item() == pytest.approx(want, rel=1e-10)
    plain = ThreeTargetLoss()(_out(feats, scale))["spot_loss"].item()
    assert abs(plain - want) > 1e-3  # the mask changed the value


def test_siglip_equals_hand_computed_value() -> None:
    feats, scale, bias = _feats(4, n=4, e=3), 10.0, -2.0
    a, b = feats["niche_image_features"], feats["niche_gene_features"]
    z = 2 * np.eye(4) - 1
    logits = scale * a @ b.T + bias
    want = -np.log(1 / (1 + np.exp(-z * logits))).sum() / 4
    got = ThreeTargetLoss(kind="siglip")(_out(feats, scale, bias))
    assert got["niche_loss"].item() == pytest.approx(want, rel=1e-10)
    with pytest.raises(ValueError, match="logit_bias"):
        ThreeTargetLoss(kind="siglip")(_out(feats, scale))
    with pytest.raises(ValueError, match="unknown loss kind"):
        ThreeTargetLoss(kind="triplet")


def test_gather_single_process_is_plain_loss_and_gradients_flow() -> None:
    out = _out(_feats(5, n=6, e=8), 10.0)
    a = ThreeTargetLoss(gather=True)(out)["loss"]
    b = ThreeTargetLoss(gather=False)(out)["loss"]
    assert a.item() == pytest.approx(b.item())
    a.backward()
    for k in ("spot_image_features", "fused_niche_features"):
        assert out[k].grad is not None and out[k].grad.abs().sum() > 0


def test_empty_batch_and_nan_are_clear_errors() -> None:
    empty = _out({k: np.zeros((0, 4)) for pair in PAIRS.values() for k in pair}, 10.0)
    with pytest.raises(EmptyBatchError, match="empty batch"):
        ThreeTargetLoss()(empty)
    feats = _feats(6)
    feats["niche_gene_features"][1, 0] = np.nan
    with pytest.raises(NonFiniteLossError, match="niche_gene_features"):
        ThreeTargetLoss()(_out(feats, 10.0))
    with pytest.raises(KeyError, match="logit_scale"):
        ThreeTargetLoss()({k: v for k, v in _out(_feats(), 1.0).items() if k != "logit_scale"})
