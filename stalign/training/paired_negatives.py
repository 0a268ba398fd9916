"""ST-Align's paired hard negatives, drawn by the data pipeline (``loss_kind: paper``).

The spots of each slide are grouped into expression clusters (``spot_clusters``: k-means on PCA of log
expression; the paper used 6). For each training spot, one random spot of each *other* cluster of the *same*
slide is a negative (M = clusters - 1 per spot); no in-batch negatives. The draw is seeded by (seed, epoch,
spot index), so it does not depend on workers, processes or a resume in the middle of an epoch. The negatives'
inputs ride along in the batch as ``batch["negatives"]`` (B*M rows, the M negatives of each spot in a row) and
the model encodes them in the same forward (``STAlign.encode_negatives``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stofm.util.errors import InputError

#: Keys of a negative's dataset item that the gene side and the fused niche need (the spot crop is not used).
DROPPED_NEGATIVE_KEYS = ("spot_image",)


class PairedNegatives:
    """Positions of a dataset's spots by (slide, cluster); ``draw(i, rng)`` -> one position per other cluster."""

    def __init__(self, clusters: Sequence[int], slides: Sequence[int]) -> None:
        clusters, slides = np.asarray(clusters, dtype=np.int64), np.asarray(slides, dtype=np.int64)
        if clusters.shape != slides.shape or clusters.ndim != 1 or len(clusters) == 0:
            raise ValueError(f"clusters {clusters.shape} and slides {slides.shape} must be equal, non-empty 1-d")
        if (clusters < 0).any():
            raise ValueError("every spot needs an expression cluster (found -1)")
        self.clusters, self.slides = clusters, slides
        self.groups: dict[tuple[int, int], np.ndarray] = {}
        self.slide_clusters: dict[int, np.ndarray] = {}
        for s in np.unique(slides):
            in_slide = slides == s
            found = np.unique(clusters[in_slide])
            self.slide_clusters[int(s)] = found
            for c in found:
                self.groups[(int(s), int(c))] = np.flatnonzero(in_slide & (clusters == c))
        counts = {s: len(c) for s, c in self.slide_clusters.items()}
        if min(counts.values()) < 2 or len(set(counts.values())) > 1:
            raise InputError(f"paired negatives need the same number (>= 2) of expression clusters in every slide; "
                             f"found {counts} (slide: clusters): use fewer hard_negative_clusters or drop small slides")
        self.per_spot = next(iter(counts.values())) - 1

    def draw(self, i: int, rng: np.random.Generator) -> np.ndarray:
        """Positions of spot ``i``'s negatives: one uniform draw from each other cluster of its slide, in cluster
        order (M = clusters - 1)."""
        s, own = int(self.slides[i]), int(self.clusters[i])
        return np.asarray([rng.choice(self.groups[(s, int(c))]) for c in self.slide_clusters[s] if c != own],
                          dtype=np.int64)


class PairedNegativeDataset:
    """A training dataset whose items carry ``negatives``: the items (less the spot crop) of their paired negatives
    from the same dataset (so they get the same seeded augmentation). Set :attr:`epoch` before each epoch."""

    def __init__(self, dataset: Any, negatives: PairedNegatives, *, seed: int) -> None:
        if len(dataset) != len(negatives.clusters):
            raise ValueError(f"{len(negatives.clusters)} cluster labels for {len(dataset)} spots")
        self.dataset, self.negatives, self.seed, self._epoch = dataset, negatives, int(seed), 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = int(value)
        if hasattr(self.dataset, "epoch"):
            self.dataset.epoch = int(value)

    def __len__(self) -> int:
        return len(self.dataset)

    def negative_positions(self, i: int) -> np.ndarray:
        """The negatives of position ``i`` in this epoch (seeded by seed, epoch and position)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._epoch, int(i), 0x4E4547]))
        return self.negatives.draw(int(i), rng)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.dataset[i])
        negs = []
        for j in self.negative_positions(i):
            neg = self.dataset[int(j)]
            negs.append({k: v for k, v in neg.items() if k not in DROPPED_NEGATIVE_KEYS})
        item["negatives"] = negs
        return item


def collate_with_negatives(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``collate`` of the spots, with their negatives collated into ``batch["negatives"]`` (B*M rows, spot-major)."""
    from stalign.data.dataset import collate

    items = [dict(it) for it in items]
    negs = [n for it in items for n in it.pop("negatives")]
    batch = collate(items)
    batch["negatives"] = collate(negs)
    return batch


def build_paired_negatives(train_shards: Any, clusters: Any) -> PairedNegatives:
    """:class:`PairedNegatives` over the positions of ``train_shards`` from cluster labels over global indices."""
    labels = np.asarray(clusters)[train_shards.indices]
    slides = train_shards.slide_numbers()
    return PairedNegatives(labels, slides)
