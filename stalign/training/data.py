"""Training data: shard root -> train/validation datasets with reproducible per-sample augmentation."""
from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError


class EmptyDataError(InputError):
    """No spots (or too few for one batch) to train or validate on."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of one spot in one epoch (independent of workers, processes and resumes)."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1)[0])


class SeededTransform:
    """The per-sample path: ``spot_transform`` / ``niche_transform`` (e.g. ``he_train_transform``) on the crops of
    each dataset item, with torch's global RNG seeded by ``sample_seed(seed, epoch, item index)``. Set
    :attr:`epoch` before each epoch. Training uses :class:`SeededBatchAugment` (the same parameters, batched)."""

    def __init__(self, dataset: Any, spot_transform: Callable, niche_transform: Callable, *, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, int(seed), 0
        self.spot_transform, self.niche_transform = spot_transform, niche_transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        item = self.dataset[i]
        seed = sample_seed(self.seed, self.epoch, int(item["index"]))
        py_state = random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            try:
                item["spot_image"] = self.spot_transform(item["spot_image"])
                item["niche_image"] = self.niche_transform(item["niche_image"])
            finally:
                random.setstate(py_state)
        return item


class SeededBatchAugment:
    """(spot, niche) ``BatchAugment`` (``stalign.models.batch_augment``) on whole batches, where the batch is.

    Each crop's parameters come from a ``torch.Generator`` seeded by ``sample_seed(seed, epoch, index)``, spot's
    draws then niche's, as :class:`SeededTransform` seeds torch's RNG: the per-sample path's parameters, drawn on
    the CPU from the batch's ``index`` before the batch is copied (``to_device``), so no device sync is needed.
    A batch's ``negatives`` (paired negatives: no spot crop) get their own spots' niche parameters."""

    def __init__(self, spot: Any, niche: Any, *, seed: int) -> None:
        self.spot, self.niche, self.seed = spot, niche, int(seed)

    def draw(self, index: Any, epoch: int) -> tuple[Any, Any]:
        """(spot, niche) parameter rows of the spots ``index`` (global indices) in ``epoch``; None when eval."""
        import torch

        if not (self.spot.train or self.niche.train):
            return None, None
        spot, niche = [], []
        for i in np.asarray(index).reshape(-1).tolist():
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, i))
            spot.append(self.spot.draw(g))
            niche.append(self.niche.draw(g))
        def as_tensor(rows: list[list[float]]) -> Any:
            return torch.tensor(rows, dtype=torch.float64) if rows and rows[0] else None

        return as_tensor(spot), as_tensor(niche)

    def _draws(self, batch: dict[str, Any], epoch: int) -> dict[str, Any]:
        out = {"": self.draw(batch["index"].cpu(), epoch)}
        if "negatives" in batch:
            out["negatives"] = self.draw(batch["negatives"]["index"].cpu(), epoch)
        return out

    def _apply(self, batch: dict[str, Any], draws: dict[str, Any]) -> dict[str, Any]:
        batch = dict(batch)
        spot, niche = draws[""]
        batch["spot_image"] = self.spot(batch["spot_image"], spot)
        batch["niche_image"] = self.niche(batch["niche_image"], niche)
        if "negatives" in batch:
            negatives = dict(batch["negatives"])
            negatives["niche_image"] = self.niche(negatives["niche_image"], draws["negatives"][1])
            batch["negatives"] = negatives
        return batch

    def __call__(self, batch: dict[str, Any], *, epoch: int = 0) -> dict[str, Any]:
        """The batch with its crops augmented where they are."""
        return self._apply(batch, self._draws(batch, epoch))

    def to_device(self, batch: dict[str, Any], device: Any, *, epoch: int, non_blocking: bool = False) -> dict[str, Any]:
        """Draw the parameters on the CPU, copy the uint8 batch to ``device`` (``non_blocking`` from pinned
        memory), augment there."""
        from accelerate.utils import send_to_device

        draws = self._draws(batch, epoch)
        return self._apply(send_to_device(batch, device, non_blocking=non_blocking), draws)


def slide_virtual_cells(ds: Any, slide_idx: int, n: int, *, seed: int = 0,
                        embed: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Virtual cells of one slide of ``ds`` (a ``ShardDataset``) from its selected spots only (held-out spots never
    leak in). Without ``embed``: ``stofm.virtual_cells`` k-means on 0.2 * standardised µm xy + 0.8 * PCA(expr),
    V = min(n, spots) less any empty cluster; returns the clusters' mean expression (V, G) and mean µm coordinates
    (V, 2). With ``embed`` (expression (N, G) -> cell embeddings (N, D), the original SToFM's gene side): the
    original's hypernodes (``stofm.original.pipeline.hypernodes``: Leiden on 0.2 xy/max|xy| + 0.8 PCA2/max|PCA2|
    of the cell embeddings in its bounding-box frame, count free, ``n`` unused); returns the clusters' mean cell
    embedding (V, D) and mean µm coordinates (V, 2)."""
    spots = ds.slide_spots(slide_idx)
    if embed is not None:
        from stofm.original.pipeline import hypernodes, normalize_coords

        xy_um = np.asarray(spots["coords_um"], np.float64)
        _, emb, labels = hypernodes(normalize_coords(xy_um), embed(spots["expr"]), seed=seed)
        xy = np.stack([xy_um[labels == k].mean(0) for k in np.unique(labels)])
        return emb.astype(np.float32), xy.astype(np.float32)
    from stofm.virtual_cells import virtual_cells

    xy, expr, _ = virtual_cells(spots["coords_um"], spots["expr"], int(n), seed=seed)
    return expr.astype(np.float32), xy.astype(np.float32)


def original_cell_embedder(model: Any, *, batch_size: int = 1024) -> Callable[[np.ndarray], np.ndarray] | None:
    """When ``model``'s niche gene encoder is the original SToFM's SE(2): expression (N, G) log1p -> its cell
    encoder's embeddings (N, D) float32 (eval mode, no gradient), what the original clusters and averages into
    virtual cells (it embeds its cells once, with a fixed cell encoder); else None."""
    import torch

    niche = getattr(model, "niche_gene_encoder", None)
    if getattr(getattr(niche, "se2", None), "arch", None) != "original":
        return None

    def embed(expr: np.ndarray) -> np.ndarray:
        cell, was = niche.cell, niche.cell.training
        cell.eval()
        try:
            with torch.no_grad():
                x = torch.as_tensor(np.asarray(expr, np.float32))
                return torch.cat([cell(x[s:s + batch_size], input_kind="log1p").float()
                                  for s in range(0, len(x), batch_size)]).numpy()
        finally:
            cell.train(was)

    return embed


class VirtualCellBank:
    """Per-slide virtual cells added to each batch: ``virtual_expr`` (B, V, G) (SToFM: k-means clusters of a
    slide's spots, mean expression and position), or with ``embed`` ``virtual_emb`` (B, V, D) (the original
    SToFM's Leiden hypernodes, mean cell embedding: :func:`slide_virtual_cells`); ``virtual_coords`` (B, V, 2) and
    ``virtual_mask`` (B, V).

    Slides are clustered from the given datasets in order: a slide seen in the first (training) dataset uses
    only its training spots, so held-out spots never shape the virtual cells of a slide that is trained on."""

    def __init__(self, datasets: Sequence[Any], *, n_slides: int, n_virtual: int, seed: int,
                 embed: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        import torch

        self.key = "virtual_expr" if embed is None else "virtual_emb"
        found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for ds in datasets:
            for k in range(n_slides):
                if k in found:
                    continue
                try:
                    found[k] = slide_virtual_cells(ds, k, n_virtual, seed=seed, embed=embed)
                except IndexError:  # no spot of slide k in this dataset
                    continue
        width = max([len(v[0]) for v in found.values()] + [n_virtual if embed is None else 1])
        dim = next(iter(found.values()))[0].shape[1] if found else len(datasets[0].genes)
        self.values = torch.zeros(n_slides, width, dim)
        self.coords = torch.zeros(n_slides, width, 2)
        self.mask = torch.zeros(n_slides, width, dtype=torch.bool)
        for k, (values, xy) in found.items():
            self.values[k, : len(values)] = torch.from_numpy(values)
            self.coords[k, : len(xy)] = torch.from_numpy(xy)
            self.mask[k, : len(values)] = True

    def attach(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` plus the virtual cells of each row's slide (on the batch's device)."""
        k = batch["slide_idx"].long()
        device = k.device
        if self.values.device != device:
            self.values, self.coords, self.mask = (t.to(device) for t in (self.values, self.coords, self.mask))
        return {**batch, self.key: self.values[k], "virtual_coords": self.coords[k], "virtual_mask": self.mask[k]}


def spot_clusters(ds: Any, *, n_clusters: int, n_total: int, seed: int) -> Any:
    """Expression k-means clusters of each slide's spots in ``ds`` (PCA-reduced log expression), as an int64
    tensor over global spot indices (-1 for spots not in ``ds``). The contrastive loss then drops same-cluster
    spots of the same slide from the negatives (ST-Align draws negatives from other clusters)."""
    import torch
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    labels = torch.full((n_total,), -1, dtype=torch.int64)
    expr, index = ds.expression_matrix(), ds.indices
    slide = ds.slide_numbers()
    for k in np.unique(slide):
        rows = np.flatnonzero(slide == k)
        n = min(n_clusters, len(rows))
        x = expr[rows]
        if len(rows) > 2:
            x = PCA(n_components=min(20, x.shape[1], len(rows) - 1), random_state=seed).fit_transform(x)
        found = KMeans(n_clusters=n, n_init=4, random_state=seed).fit_predict(x) if n > 1 else np.zeros(len(rows))
        labels[torch.from_numpy(index[rows])] = torch.from_numpy(found.astype(np.int64))
    return labels


@dataclasses.dataclass
class TrainData:
    """The datasets of one run."""

    train: Any  # ShardDataset (or SeededTransform around it: per-sample transforms; PairedNegativeDataset)
    val: Any | None  # ShardDataset (SeededTransform with per-sample eval transforms); None when val_fraction == 0
    genes: list[str]
    virtual_cells: VirtualCellBank | None
    clusters: Any | None  # int64 tensor over global spot indices (hard negatives), or None
    root: Path
    n_train: int
    n_val: int
    n_left_out: int = 0  # spots in neither set (block: the margin around scored spots; slide: unscored spots)
    split_by: str = "spot"
    collate: Callable | None = None  # the training loader's collate (None: ``stalign.data.dataset.collate``)
    augment: SeededBatchAugment | None = None  # batched training transforms, applied on the device
    val_augment: SeededBatchAugment | None = None  # batched eval transforms (resize)


LEFT_OUT_WHY = {"block": "the niche-wide margin around the scored validation spots",
                "slide": "spots of held-out slides beyond val_max_spots"}


def split_summary(data: TrainData) -> str:
    """The split as ``stalign train`` prints it: spots trained on, scored, and left out (with why)."""
    left = f", {data.n_left_out} left out: {LEFT_OUT_WHY.get(data.split_by, '')}" if data.n_left_out else ""
    return f"training {data.n_train} spots ({data.n_val} held out for scoring{left})"


def shard_genes(root: str | Path) -> list[str]:
    """The gene panel of the shards under ``root`` (raises FileNotFoundError when there are none)."""
    from stalign.data.shards import read_manifest

    root = Path(root)
    if not str(root) or not (root / "manifest.json").is_file():
        raise FileNotFoundError(f"no shards at {str(root) or '(data not set)'}: expected {root / 'manifest.json'}; "
                                f"make them with `stalign prep` and set `data:` in the config")
    return list(read_manifest(root)["genes"])


def build_train_data(*, root: str | Path, slides: Sequence[str] | None, val_fraction: float, split_by: str,
                     seed: int, niche_spots: int, train_transforms: tuple[Callable, Callable] | None,
                     eval_transforms: tuple[Callable, Callable] | None, val_max_spots: int,
                     n_virtual: int = 0, hard_negative_clusters: int = 0, paired_negatives: bool = False,
                     virtual_embed: Callable[[np.ndarray], np.ndarray] | None = None,
                     images: bool = True) -> TrainData:
    """Split the spots of the shards under ``root`` into train/validation datasets (see ``split_indices``);
    ``*_transforms`` are (spot, niche) crop transforms: ``BatchAugment`` pairs (batched, applied by the trainer:
    ``TrainData.augment`` / ``val_augment``) or per-sample callables (``SeededTransform``). ``paired_negatives``: training items carry one spot of each
    other expression cluster of their slide (``stalign.training.paired_negatives``; needs hard_negative_clusters).
    ``virtual_embed``: the original SToFM's virtual cells from these cell embeddings (:func:`original_cell_embedder`).
    ``images=False``: the datasets read no crop (training from stored features, ``stalign.training.stored_features``)."""
    from stalign.data.dataset import ShardDataset, split_indices

    root = Path(root)
    shard_genes(root)
    if slides is not None and len(slides) == 0:
        raise EmptyDataError(f"slides=[] selects no slide of {root}")
    try:
        full = ShardDataset(root, slides=slides, niche_spots=niche_spots)
    except (KeyError, IndexError) as err:  # an unknown slide id
        raise EmptyDataError(f"{str(err).strip(chr(39))}") from None
    if len(full) == 0:
        raise EmptyDataError(f"the shards under {root} hold no spots" + (f" of slides {slides}" if slides else ""))
    if val_fraction > 0:
        train_idx, val_idx = split_indices(full, val_fraction=val_fraction, by=split_by, seed=seed,
                                           max_val=val_max_spots)
    else:
        train_idx, val_idx = full.indices, np.zeros(0, dtype=np.int64)
    if len(train_idx) == 0:
        raise EmptyDataError(f"no training spots left under {root} after holding out {len(val_idx)} for validation")
    train_shards = ShardDataset(root, indices=train_idx, niche_spots=niche_spots, images=images)
    val_shards = ShardDataset(root, indices=val_idx, niche_spots=niche_spots, images=images) if len(val_idx) else None
    bank = None
    if n_virtual > 0:
        bank = VirtualCellBank([d for d in (train_shards, val_shards) if d is not None],
                               n_slides=len(full.slide_ids), n_virtual=n_virtual, seed=seed, embed=virtual_embed)

    from stalign.models.batch_augment import BatchAugment

    def batched(transforms: tuple[Callable, Callable] | None) -> SeededBatchAugment | None:
        ok = transforms is not None and isinstance(transforms[0], BatchAugment)
        return SeededBatchAugment(*transforms, seed=seed) if ok else None

    def wrap(ds: Any, transforms: tuple[Callable, Callable] | None) -> Any:
        plain = ds is None or transforms is None or batched(transforms) is not None
        return ds if plain else SeededTransform(ds, *transforms, seed=seed)

    clusters = None
    if hard_negative_clusters > 1:
        clusters = spot_clusters(train_shards, n_clusters=hard_negative_clusters, n_total=int(full.indices.max()) + 1,
                                 seed=seed)
    train, val = wrap(train_shards, train_transforms), wrap(val_shards, eval_transforms)
    collate = None
    if paired_negatives:
        from stalign.training.paired_negatives import (
            PairedNegativeDataset,
            build_paired_negatives,
            collate_with_negatives,
        )

        if clusters is None:
            raise InputError("paired negatives need expression clusters: set hard_negative_clusters >= 2")
        train = PairedNegativeDataset(train, build_paired_negatives(train_shards, clusters), seed=seed)
        collate = collate_with_negatives
    return TrainData(train=train, val=val, genes=list(full.genes), virtual_cells=bank, clusters=clusters, root=root,
                     n_train=len(train_idx), n_val=len(val_idx),
                     n_left_out=len(full) - len(train_idx) - len(val_idx), split_by=split_by, collate=collate,
                     augment=batched(train_transforms), val_augment=batched(eval_transforms))
