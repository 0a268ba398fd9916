"""Training from stored image features (``feature_views: K``): the frozen image encoders' trunk features of K
augmented views of every crop, computed once into the feature store (``stalign.data.feature_store``) and read by
every later run and arm, fed to the model instead of the crops (an ``ImageEncoder`` takes a (B, out_dim) float
tensor as its trunk's features).

View ``v`` of spot ``i`` is the training augmentation (``SeededBatchAugment``, the run's flips, rot90, colour and
stain jitter, resize) drawn with ``sample_seed(VIEW_SEED, v, i)``: the views do not depend on the run's seed, so
runs of other seeds, arms and configs with the same encoders, crops and augmentation share them (a run with more
views computes only the missing ones). In epoch ``e`` spot ``i`` is fed view ``sample_seed(seed, e, i) % K``;
validation (and ``augment: false``) reads the plain view (resize only, what validation from pixels feeds).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stalign.training.data import SeededBatchAugment, sample_seed
from stofm.util.errors import InputError

#: The seed of the stored views' augmentation (fixed, so every run shares them).
VIEW_SEED = 0


class StoredViews:
    """The stored features of the shards under ``root`` for ``model``'s frozen image encoders: ``views`` (N, K, F)
    tensors per side for training, ``plain`` (N, F) for validation, over global spot indices."""

    def __init__(self, model: Any, root: str | Path, *, views: int, augment: SeededBatchAugment | None,
                 plain: SeededBatchAugment | None, seed: int, batch_size: int = 64, progress: bool = False,
                 log: Any = print) -> None:
        import torch

        from stalign.data.feature_store import FeatureStore, frozen_image_features

        if views < 1:
            raise InputError(f"feature_views must be >= 1 to train from stored features, got {views}")
        check_frozen(model)
        store = FeatureStore(root, log=log)

        def features(transform: SeededBatchAugment | None, tag: dict[str, Any], epoch: int = 0) -> dict[str, Any]:
            out = frozen_image_features(model, store, batch_size=batch_size, progress=progress, tag=tag,
                                        transform=None if transform is None else (lambda b: transform(b, epoch=epoch)))
            return {side: torch.from_numpy(x) for side, x in out.items()}

        self.seed, self.k = int(seed), int(views) if augment is not None else 1
        self.plain = features(plain, {"view": "plain", "transform": _describe(plain)})
        if augment is None:  # no augmentation: every view would be the plain one
            self.views = {side: x[:, None] for side, x in self.plain.items()}
        else:
            shared = SeededBatchAugment(augment.spot, augment.niche, seed=VIEW_SEED)
            per_view = [features(shared, {"view": v, "view_seed": VIEW_SEED, "transform": _describe(augment)},
                                 epoch=v) for v in range(self.k)]
            self.views = {side: torch.stack([f[side] for f in per_view], dim=1) for side in ("spot", "niche")}
        self.summary = store.summary()

    def _choose(self, index: Any, epoch: int | None) -> tuple[Any, Any]:
        """(global index, view) rows for ``index`` (a tensor of global spot indices) in ``epoch`` (None: plain)."""
        import torch

        idx = index.reshape(-1).cpu()
        if epoch is None:
            return idx, None
        if self.k == 1:
            return idx, torch.zeros_like(idx)
        return idx, torch.tensor([sample_seed(self.seed, epoch, int(i)) % self.k for i in idx.tolist()])

    def _lookup(self, side: str, index: Any, epoch: int | None, device: Any) -> Any:
        idx, view = self._choose(index, epoch)
        rows = self.plain[side][idx] if view is None else self.views[side][idx, view]
        return rows.to(device, non_blocking=True)

    def attach(self, batch: dict[str, Any], *, epoch: int | None, device: Any = None) -> dict[str, Any]:
        """``batch`` (no crops needed) with ``spot_image`` / ``niche_image`` = the stored features of its spots (and
        its ``negatives``' niche features): the view of ``epoch``, or the plain view when ``epoch`` is None."""
        device = device if device is not None else batch["index"].device
        out = dict(batch)
        for side in ("spot", "niche"):
            out[f"{side}_image"] = self._lookup(side, batch["index"], epoch, device)
        if "negatives" in batch:
            negatives = dict(batch["negatives"])
            negatives["niche_image"] = self._lookup("niche", negatives["index"], epoch, device)
            out["negatives"] = negatives
        return out


def _describe(augment: SeededBatchAugment | None) -> list[str] | None:
    """The augmentation's settings as the store's key records them."""
    return None if augment is None else [repr(augment.spot), repr(augment.niche)]


def check_frozen(model: Any) -> None:
    """Training from stored features needs image encoders without a trainable parameter (one line otherwise)."""
    from stalign.data.feature_store import trainable_image_sides

    trainable = trainable_image_sides(model)
    if trainable:
        side = trainable[0]
        spec = getattr(model, f"{side}_image_encoder").spec
        raise InputError(f"feature_views needs frozen image encoders; the {side} image encoder {spec} trains: set "
                         f"model_overrides {side}_image freeze: true (or image: freeze: true) or feature_views: 0")

