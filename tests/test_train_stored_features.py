"""Training from stored image features (``feature_views``) and early stopping on the held-out loss.

A frozen-encoder run reads K augmented views per crop from the feature store instead of the crops (computed once,
shared by the next run), feeds each spot a view chosen per epoch, validates on the plain view, reports the held-out
loss; early stopping ends a run whose held-out loss has plateaued and saves the weights of its best evaluation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from stofm.util.errors import InputError

FROZEN = {"spot_image": {"freeze": True}, "niche_image": {"freeze": True}}
BASE = dict(model="stalign-tiny", model_overrides=FROZEN, cpu=True, batch_size=8, max_steps=6, warmup_steps=1,
            lr=1e-3, eval_every=3, save_every=0, log_every=1, progress=False, tensorboard=False, val_fraction=0.25,
            val_max_spots=0, virtual_cells=0)


def _train(root, out, **kw):
    from stalign.training import train_from_config

    return train_from_config({**BASE, **kw}, data=str(root), output_dir=str(out))


def test_frozen_run_trains_from_stored_views_without_reading_crops(small_shards, tmp_path, monkeypatch):
    from stalign.data import dataset

    root = small_shards("squidpy")
    before = set((root / "features").rglob("*.npy"))  # the session's shards may hold other tests' features
    first = _train(root, tmp_path / "a", feature_views=2)
    assert first.checkpoint is not None and np.isfinite([loss for _, loss in first.losses]).all()
    assert [h["step"] for h in first.val_history] == [3, 6] and np.isfinite(first.metrics["val_loss"])
    sides = sorted(p.name.split("-")[0] for p in set((root / "features").rglob("*.npy")) - before)
    assert sides == ["niche", "niche", "niche", "spot", "spot", "spot"]  # plain + 2 views of one shard

    def no_crops(self, *args, **kwargs):  # a second run reads every view from the store, no pixel
        raise AssertionError("crops read")

    monkeypatch.setattr(dataset, "read_rows", no_crops)  # every crop ShardDataset reads goes through read_rows
    again = _train(root, tmp_path / "b", feature_views=2)
    assert [loss for _, loss in again.losses] == [loss for _, loss in first.losses]  # same views, same seed


def test_stored_views_are_the_augmented_crops_through_the_frozen_encoder(small_shards):
    """The stored plain view is the encoder's output on the eval-resized crops; augmented views differ from it and
    from each other, and each spot's view in an epoch is drawn from the run's seed."""
    import stalign
    from stalign.data.dataset import ShardDataset, collate
    from stalign.models.batch_augment import BatchAugment
    from stalign.training.data import SeededBatchAugment
    from stalign.training.stored_features import StoredViews

    root = small_shards("squidpy")
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=ShardDataset(root).genes, **FROZEN)
    aug = [BatchAugment(e.input_size, e.interpolation, train=train)
           for train in (True, False) for e in (model.spot_image_encoder, model.niche_image_encoder)]
    views = StoredViews(model, root, views=3, augment=SeededBatchAugment(*aug[:2], seed=0),
                        plain=SeededBatchAugment(*aug[2:], seed=0), seed=5)
    batch = collate([ShardDataset(root)[i] for i in range(6)])
    enc = model.spot_image_encoder.eval()
    with torch.no_grad():
        expected = enc(aug[2](batch["spot_image"], None))
    got = views.attach(batch, epoch=None)
    torch.testing.assert_close(got["spot_image"], expected, rtol=1e-4, atol=1e-5)
    v = views.views["spot"][:6]
    assert v.shape[1] == 3 and not torch.allclose(v[:, 0], v[:, 1]) and not torch.allclose(v[:, 0], got["spot_image"])
    picked = views.attach(batch, epoch=4)["spot_image"]
    assert all(any(torch.equal(picked[i], v[i, k]) for k in range(3)) for i in range(6))


def test_trainable_encoder_with_feature_views_is_one_line(small_shards, tmp_path):
    with pytest.raises(InputError, match="feature_views needs frozen image encoders"):
        _train(small_shards("squidpy"), tmp_path / "x", feature_views=2, model_overrides={})


def test_early_stopping_keeps_the_best_weights(small_shards, tmp_path):
    """A run whose held-out loss stops improving ends before max_steps, saves final weights of its best
    evaluation, and says so in its result and checkpoint."""
    import stalign

    result = _train(small_shards("squidpy"), tmp_path / "e", feature_views=1, max_steps=400, eval_every=2,
                    early_stop_patience=2, early_stop_min_delta=10.0)  # nothing counts as an improvement
    assert result.stopped_early and result.step == 6 and result.best_step == 2
    assert result.checkpoint is not None
    stalign.load_checkpoint(result.checkpoint)
    assert "| training best_step | 2 |" in (result.checkpoint / "README.md").read_text()  # the model card
    assert [h["step"] for h in result.val_history] == [2, 4, 6, 6]  # the last: the best weights, re-scored
    assert result.val_history[-1]["val_loss"] == pytest.approx(result.val_history[0]["val_loss"], rel=1e-5)


def test_early_stopping_needs_held_out_evaluations(small_shards, tmp_path):
    from stofm.util.config_io import ConfigError

    with pytest.raises(ConfigError, match="early_stop_patience needs held-out evaluations"):
        _train(small_shards("squidpy"), tmp_path / "y", early_stop_patience=2, eval_every=0)
