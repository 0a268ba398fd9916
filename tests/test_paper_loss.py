"""The paper objective (loss_kind: paper): paired InfoNCE image->gene only at a fixed temperature 0.1, weights
0.3 / 0.3 / 0.4, no in-batch negatives; negatives one per other expression cluster of the same slide, seeded."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stalign.training.config import ConfigError, resolve_config
from stalign.training.losses import PAIRED_TARGETS, PairedNegativeLoss, paired_infonce
from stalign.training.paired_negatives import PairedNegativeDataset, PairedNegatives, collate_with_negatives


def _out(b: int = 4, m: int = 3, e: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for q, p, n in PAIRED_TARGETS.values():
        for key, shape in ((q, (b, e)), (p, (b, e)), (n, (b, m, e))):
            out[key] = torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)
    out["logit_scale"] = torch.tensor(1.0)
    return out


def test_paired_infonce_equals_a_hand_computed_case_at_temperature_0_1() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])          # normalised inside: [1, 0], [0, 1]
    p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    n = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.8, 0.6]]])
    # row 0: sims [0.6 | 1.0, 0.0]; row 1: sims [1.0 | 0.0, 0.6]; loss_i = -log softmax(sims / 0.1)[0]
    rows = [[0.6, 1.0, 0.0], [1.0, 0.0, 0.6]]
    hand = [-(r[0] / 0.1) + math.log(sum(math.exp(s / 0.1) for s in r)) for r in rows]
    assert paired_infonce(q, p, n).item() == pytest.approx(sum(hand) / 2, rel=1e-5)


def test_loss_weights_direction_fixed_temperature_and_no_in_batch_negatives() -> None:
    out = _out()
    loss_fn = PairedNegativeLoss(alpha=0.3, beta=0.3)
    terms = loss_fn(out)
    assert terms["loss"].item() == pytest.approx(
        0.3 * terms["spot_loss"].item() + 0.3 * terms["niche_loss"].item() + 0.4 * terms["fusion_loss"].item())
    for name, (q, p, n) in PAIRED_TARGETS.items():
        assert terms[name].item() == pytest.approx(paired_infonce(out[q], out[p], out[n], temperature=0.1).item())
    # image -> gene only: the image side is never a key, so swapping the roles of image and gene changes the loss
    swapped = dict(out, spot_image_features=out["spot_gene_features"], spot_gene_features=out["spot_image_features"])
    assert abs(loss_fn(swapped)["spot_loss"].item() - terms["spot_loss"].item()) > 1e-3
    # fixed temperature: the model's logit_scale is ignored and the loss has nothing to learn
    assert loss_fn({**out, "logit_scale": torch.tensor(50.0)})["loss"].item() == pytest.approx(terms["loss"].item())
    assert list(loss_fn.parameters()) == []
    # no in-batch negatives: the batch loss is the mean of the one-spot losses
    singles = [loss_fn({k: v[i:i + 1] if v.ndim else v for k, v in out.items()})["loss"].item() for i in range(4)]
    assert terms["loss"].item() == pytest.approx(sum(singles) / 4, rel=1e-5)
    with pytest.raises(KeyError, match="paired negatives"):
        loss_fn({k: v for k, v in out.items() if not k.startswith("negative_")})


def test_negatives_one_per_other_cluster_of_the_same_slide_seeded() -> None:
    rng = np.random.default_rng(0)
    slides = np.repeat([0, 1], 60)
    clusters = np.concatenate([rng.permutation(np.arange(60) % 6), rng.permutation(np.arange(60) % 6)])
    neg = PairedNegatives(clusters, slides)
    assert neg.per_spot == 5
    seen: set[int] = set()
    for i in range(len(slides)):
        drawn = neg.draw(i, np.random.default_rng(i))
        assert len(drawn) == 5                                  # clusters - 1
        assert (slides[drawn] == slides[i]).all()               # never another slide
        assert clusters[i] not in clusters[drawn]               # never the spot's own cluster
        assert sorted(clusters[drawn]) == sorted(set(range(6)) - {clusters[i]})  # one from each other cluster
        assert np.array_equal(drawn, neg.draw(i, np.random.default_rng(i)))       # seeded
        seen.update(drawn.tolist())
    assert len(seen) > 100  # random members, not always the same representative
    with pytest.raises(ValueError, match="same number"):
        PairedNegatives([0, 1, 2, 0, 1], [0, 0, 0, 1, 1])
    with pytest.raises(ValueError, match=">= 2"):
        PairedNegatives([0, 0], [0, 0])


class _Items:
    """A stand-in dataset: item i carries its index; ``epoch`` is recorded like SeededTransform's."""

    epoch = 0

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"spot_image": torch.zeros(3, 2, 2), "spot_expr": torch.full((4,), float(i)),
                "index": torch.tensor(i)}


def test_dataset_draws_by_seed_epoch_and_index_and_collates_spot_major() -> None:
    clusters, slides = np.arange(12) % 3, np.zeros(12, dtype=int)
    ds = PairedNegativeDataset(_Items(), PairedNegatives(clusters, slides), seed=7)
    first = [ds.negative_positions(i).tolist() for i in range(12)]
    assert first == [PairedNegativeDataset(_Items(), PairedNegatives(clusters, slides), seed=7).negative_positions(i)
                     .tolist() for i in range(12)]
    ds.epoch = 1
    assert ds.dataset.epoch == 1 and [ds.negative_positions(i).tolist() for i in range(12)] != first
    batch = collate_with_negatives([ds[2], ds[5]])
    assert batch["spot_expr"].shape == (2, 4) and batch["negatives"]["spot_expr"].shape == (4, 4)
    assert "spot_image" not in batch["negatives"]  # the negatives' spot crop is never used
    idx = batch["negatives"]["index"].view(2, 2)  # spot-major: row r holds the negatives of spot r
    assert idx[0].tolist() == ds.negative_positions(2).tolist() and idx[1].tolist() == ds.negative_positions(5).tolist()
    assert all(clusters[j] != clusters[2] for j in idx[0].tolist())


def test_paper_loss_needs_clusters_in_the_run_config() -> None:
    with pytest.raises(ConfigError, match="hard_negative_clusters >= 2"):
        resolve_config({"data": "x", "loss_kind": "paper"})
    cfg = resolve_config("paper_tiny")
    assert (cfg.model, cfg.loss_kind, cfg.hard_negative_clusters, cfg.alpha, cfg.beta) == (
        "stalign-paper-tiny", "paper", 6, 0.3, 0.3)
    gpu = resolve_config("paper")
    assert (gpu.model, gpu.loss_kind, gpu.hard_negative_clusters, gpu.cpu) == ("stalign-paper", "paper", 6, False)


def test_training_data_of_real_shards_carries_paired_negatives(small_shards) -> None:
    from stalign.training.data import build_train_data

    data = build_train_data(root=small_shards("squidpy"), slides=None, val_fraction=0.2, split_by="spot", seed=3,
                            niche_spots=4, train_transforms=None, eval_transforms=None, val_max_spots=0,
                            hard_negative_clusters=4, paired_negatives=True)
    batch = data.collate([data.train[i] for i in range(5)])
    neg = batch["negatives"]
    assert neg["spot_expr"].shape == (15, batch["spot_expr"].shape[1])  # 4 clusters -> 3 negatives per spot
    own = data.clusters[batch["index"]].repeat_interleave(3)
    assert (data.clusters[neg["index"]] != own).all()                   # never the spot's own cluster
    assert (neg["slide_idx"] == batch["slide_idx"].repeat_interleave(3)).all()
    assert len(set(data.clusters[neg["index"][:3]].tolist())) == 3      # one from each other cluster
    train_spots = set(data.train.dataset.indices.tolist())
    assert set(neg["index"].tolist()) <= train_spots                    # held-out spots are never negatives
    with pytest.raises(ValueError, match="hard_negative_clusters"):
        build_train_data(root=small_shards("squidpy"), slides=None, val_fraction=0.2, split_by="spot", seed=3,
                         niche_spots=4, train_transforms=None, eval_transforms=None, val_max_spots=0,
                         paired_negatives=True)
