"""Training data: shard root -> train/validation datasets with reproducible per-sample augmentation."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np


class GenePanelError(ValueError):
    """The shards' gene panel differs from the model's."""


class EmptyDataError(ValueError):
    """No spots (or too few for one batch) to train or validate on."""


class SeededTransform:
    """Apply ``transform`` to the spot and niche crops of a dataset item with RNG seeded by
    (seed, epoch, item index), so augmentations do not depend on worker count, process count or on a
    resume in the middle of an epoch. Set :attr:`epoch` before each epoch."""

    def __init__(self, dataset: Any, transform: Callable, *, seed: int) -> None:
        self.dataset, self.transform, self.seed, self.epoch = dataset, transform, int(seed), 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = self.dataset[i]
        seed = int(np.random.SeedSequence([self.seed, self.epoch, int(item["index"])]).generate_state(1)[0])
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                item["spot_image"] = self.transform(item["spot_image"])
                item["niche_image"] = self.transform(item["niche_image"])
            finally:
                random.setstate(py_state)
        return item


@dataclasses.dataclass
class TrainData:
    """The datasets of one run."""

    train: Any  # ShardDataset, or SeededTransform around it when augmenting
    val: Any | None  # ShardDataset with the eval transform; None when val_fraction == 0
    genes: list[str]
    root: Path
    n_train: int
    n_val: int


def check_gene_panel(shard_genes: Sequence[str], model_genes: Sequence[str], *, root: str | Path,
                     checkpoint: str | Path) -> None:
    """Raise :class:`GenePanelError` unless the shards carry exactly the checkpoint's genes, in order."""
    shard_genes, model_genes = list(shard_genes), list(model_genes)
    if shard_genes == model_genes:
        return
    missing = [g for g in model_genes if g not in set(shard_genes)]
    extra = [g for g in shard_genes if g not in set(model_genes)]
    detail = (f"{len(missing)} of the model's genes are missing from the shards (e.g. {missing[:5]}), "
              f"{len(extra)} shard genes are unknown to the model (e.g. {extra[:5]})"
              if missing or extra else "same genes in a different order")
    raise GenePanelError(
        f"gene panel of the shards under {root} ({len(shard_genes)} genes) differs from the panel of the model "
        f"checkpoint {checkpoint} ({len(model_genes)} genes): {detail}. Prepare the shards with the checkpoint's "
        f"gene list (stalign prep --genes) or train a new model instead of --init.")


def shard_genes(root: str | Path) -> list[str]:
    """The gene panel of the shards under ``root`` (raises FileNotFoundError when there are none)."""
    from data_prep.shards import read_manifest

    root = Path(root)
    if not str(root) or not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"no shards at {str(root) or '(data not set)'}: expected {root / 'manifest.json'}; "
                                f"make them with `stalign prep` and set `data:` in the config")
    return list(read_manifest(root)["genes"])


def build_train_data(*, root: str | Path, slides: Sequence[str] | None, val_fraction: float, split_by: str,
                     seed: int, niche_spots: int, train_transform: Callable | None,
                     eval_transform: Callable | None, val_max_spots: int) -> TrainData:
    """Split the spots of the shards under ``root`` into train/validation datasets (see ``split_indices``)."""
    from data_prep.dataset import ShardDataset, split_indices

    root = Path(root)
    shard_genes(root)
    full = ShardDataset(root, slides=slides, niche_spots=niche_spots)
    if len(full) == 0:
        raise EmptyDataError(f"the shards under {root} hold no spots" + (f" of slides {slides}" if slides else ""))
    if val_fraction > 0:
        train_idx, val_idx = split_indices(full, val_fraction=val_fraction, by=split_by, seed=seed)
        if val_max_spots and len(val_idx) > val_max_spots:
            val_idx = np.sort(np.random.default_rng(seed).choice(val_idx, size=val_max_spots, replace=False))
    else:
        train_idx, val_idx = full.indices, np.zeros(0, dtype=np.int64)
    if len(train_idx) == 0:
        raise EmptyDataError(f"no training spots left under {root} after holding out {len(val_idx)} for validation")
    train = ShardDataset(root, indices=train_idx, niche_spots=niche_spots)
    if train_transform is not None:
        train = SeededTransform(train, train_transform, seed=seed)
    val = (ShardDataset(root, indices=val_idx, transform=eval_transform, niche_spots=niche_spots)
           if len(val_idx) else None)
    return TrainData(train=train, val=val, genes=list(full.genes), root=root, n_train=len(train_idx),
                     n_val=len(val_idx))
