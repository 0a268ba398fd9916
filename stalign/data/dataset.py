"""``ShardDataset``: random access over ``stalign prep`` shards (see docs/ARCHITECTURE.md "ShardDataset").

Indices are global over the manifest: slide 0's spots first, then slide 1's, ... ``slides`` and
``indices`` select a subset; ``ds[i]`` returns the i-th selected spot and its global ``index``.
HDF5 handles are opened lazily in the process that reads (and re-opened after a fork), so the dataset
works with ``DataLoader(num_workers>0)``. Small per-spot arrays are cached per slide; patches are read
from disk on each access, a whole batch at once through ``__getitems__`` (what ``DataLoader`` calls).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data

from stalign.data.patch_reads import read_rows
from stalign.data.shards import ShardError, read_manifest, shard_attrs
from stofm.util.errors import InputError

_CACHED = ("expr", "niche_expr", "coords_um", "neighbors")


class ShardDataset(torch.utils.data.Dataset):
    """Spot/niche crops and expression from the shards under ``root`` (a ``torch`` map-style dataset);
    ``images=False``: everything but the crops (training from stored image features reads no pixel)."""

    def __init__(self, root: str | os.PathLike, *, slides: Sequence[str | int] | None = None,
                 indices: Sequence[int] | np.ndarray | None = None, transform: Callable | None = None,
                 niche_spots: int = 16, images: bool = True) -> None:
        self.root = Path(root)
        self.images = bool(images)
        self.manifest = read_manifest(self.root)
        self.genes: list[str] = list(self.manifest["genes"])
        self.transform = transform
        self.niche_spots = int(niche_spots)
        entries = self.manifest["slides"]
        if not entries:
            raise ShardError(f"{self.root}: the manifest lists no slides")
        self.slide_ids = [s["slide_id"] for s in entries]
        self._paths = [self.root / s["shard"] for s in entries]
        for path, entry in zip(self._paths, entries):
            attrs = shard_attrs(path)
            if attrs is None:
                raise ShardError(f"{path}: shard missing or incomplete (re-run `stalign prep`)")
            if attrs["n_spots"] != entry["n_spots"] or list(attrs["genes"]) != self.genes:
                raise ShardError(f"{path}: shard does not match {self.root / 'manifest.json'}")
        counts = np.asarray([s["n_spots"] for s in entries], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        chosen = range(len(entries)) if slides is None else [self._slide_index(s) for s in slides]
        selected = np.concatenate([np.arange(self._offsets[k], self._offsets[k + 1]) for k in chosen])
        if indices is not None:
            idx = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = idx[~np.isin(idx, selected)]
            if len(bad):
                raise IndexError(f"indices {bad[:5].tolist()} are not spots of the selected slides")
            selected = idx
        self._indices = selected
        self._pid: int | None = None
        self._files: dict[int, Any] = {}
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def _slide_index(self, slide: str | int) -> int:
        if isinstance(slide, (int, np.integer)):
            if not 0 <= slide < len(self.slide_ids):
                raise IndexError(f"slide index {slide} out of range (0..{len(self.slide_ids) - 1})")
            return int(slide)
        if slide not in self.slide_ids:
            raise KeyError(f"slide {slide!r} is not in {self.root / 'manifest.json'}")
        return self.slide_ids.index(slide)

    def __len__(self) -> int:
        return len(self._indices)

    @property
    def indices(self) -> np.ndarray:
        """Global index of every selected spot, in dataset order."""
        return self._indices.copy()

    def slide_of(self, i: int) -> int:
        """Manifest slide number of dataset item ``i``."""
        return int(self._slide_number(self._indices[i]))

    def slide_numbers(self) -> np.ndarray:
        """Manifest slide number of every selected spot, in dataset order (``slide_of`` of all items at once)."""
        return self._slide_number(self._indices)

    def _slide_number(self, global_idx: Any) -> Any:
        """Manifest slide number of global spot indices (shards are concatenated in manifest order)."""
        return np.searchsorted(self._offsets, global_idx, side="right") - 1

    def _file(self, k: int):
        import h5py

        if self._pid != os.getpid():  # first use in this process (or a forked worker): fresh handles
            self._files, self._pid = {}, os.getpid()
        if k not in self._files:
            self._files[k] = h5py.File(self._paths[k], "r")
        return self._files[k]

    def _arrays(self, k: int) -> dict[str, np.ndarray]:
        if k not in self._cache:
            from stofm.util.geometry import bbox_center, bbox_units_per_um, units_per_um

            f = self._file(k)
            self._cache[k] = {name: f[name][()] for name in _CACHED}
            # stofm's model units for this slide (its whole diameter = 100), from all of its spots
            self._cache[k]["units_per_um"] = np.float32(units_per_um(self._cache[k]["coords_um"]))
            # the original SToFM's frame: bounding-box diagonal = 100 units, origin at the box centre
            self._cache[k]["bbox_units_per_um"] = np.float32(bbox_units_per_um(self._cache[k]["coords_um"]))
            self._cache[k]["bbox_center_um"] = bbox_center(self._cache[k]["coords_um"]).astype(np.float32)
        return self._cache[k]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_files={}, _pid=None, _cache={})
        return state

    def close(self) -> None:
        """Close the open HDF5 handles of this process."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def _niche_spots(self, a: dict[str, np.ndarray], rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The first ``niche_spots`` stored neighbours of shard rows ``rows`` of one slide (its arrays ``a``): their
        expression (B, m, G) float32, µm coordinates (B, m, 2) float32 and whether each lies inside the niche crop
        (B, m) bool; zeros where a row has fewer neighbours."""
        m, half = self.niche_spots, float(self.manifest["niche_um"]) / 2.0
        nb = a["neighbors"][rows][:, :m].astype(np.int64)
        valid = nb >= 0
        nb_safe = np.where(valid, nb, rows[:, None])
        nb_xy = a["coords_um"][nb_safe].astype(np.float32)
        b, kk = nb.shape
        spot_expr, coords = np.zeros((b, m, len(self.genes)), np.float32), np.zeros((b, m, 2), np.float32)
        mask = np.zeros((b, m), bool)
        spot_expr[:, :kk] = np.where(valid[..., None], a["expr"][nb_safe], 0)
        coords[:, :kk] = np.where(valid[..., None], nb_xy, 0)
        mask[:, :kk] = valid & np.all(np.abs(nb_xy - a["coords_um"][rows][:, None]) <= half, axis=2)
        return spot_expr, coords, mask

    def __getitem__(self, i: int) -> dict[str, Any]:
        """The i-th selected spot: the batch of one (``_batch``) without its batch dimension, the crops (3, P, P)
        through ``transform`` when there is one (else contiguous)."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} spots")
        item = {key: value[0] for key, value in self._batch([i]).items()}
        for key in ("spot_image", "niche_image") if self.images else ():
            item[key] = self.transform(item[key]) if self.transform is not None else item[key].contiguous()
        return item

    def __getitems__(self, positions: Sequence[int]) -> dict[str, Any] | list[dict[str, Any]]:
        """A whole batch at once (``DataLoader`` calls this with each batch's positions): the collated dict that
        ``collate([ds[i] for i in positions])`` gives, read per slide in shard order as one chunk per crop
        (``stalign.data.patch_reads``) and the per-spot arrays gathered with numpy. Crops are (B, 3, P, P)
        uint8 views of (B, P, P, 3) buffers (channels-last strides). With a ``transform``: the list of items."""
        if self.transform is not None:
            return [self[int(i)] for i in positions]
        return self._batch(positions)

    def _batch(self, positions: Sequence[int]) -> dict[str, Any]:
        """The collated batch of ``positions`` (see ``__getitems__``), crops untransformed."""
        import torch

        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) == 0 or pos.min() < -len(self) or pos.max() >= len(self):
            raise IndexError(f"positions {pos[:5].tolist()}... out of range for {len(self)} spots")
        g = self._indices[pos]
        slide = self._slide_number(g)
        b, m, n_genes, p = len(pos), self.niche_spots, len(self.genes), int(self.manifest["patch_px"])
        out = {name: np.empty((b, p, p, 3), dtype=np.uint8)
               for name in (("spot_patches", "niche_patches") if self.images else ())}
        expr, niche_expr = np.empty((b, n_genes), np.float32), np.empty((b, n_genes), np.float32)
        spot_expr, coords = np.empty((b, m, n_genes), np.float32), np.empty((b, m, 2), np.float32)
        mask, xy = np.empty((b, m), bool), np.empty((b, 2), np.float32)
        scalars = np.empty((b, 4), np.float32)  # units_per_um, bbox_units_per_um, bbox centre x, y
        for k in np.unique(slide):
            sel = np.flatnonzero(slide == k)
            rows = g[sel] - self._offsets[k]
            f, a = self._file(int(k)), self._arrays(int(k))
            for name, buf in out.items():
                if len(sel) == b:
                    read_rows(f[name], rows, buf)
                else:
                    part = np.empty((len(sel), p, p, 3), dtype=np.uint8)
                    read_rows(f[name], rows, part)
                    buf[sel] = part
            spot_expr[sel], coords[sel], mask[sel] = self._niche_spots(a, rows)
            expr[sel], niche_expr[sel] = a["expr"][rows], a["niche_expr"][rows]
            xy[sel] = a["coords_um"][rows]
            scalars[sel] = [a["units_per_um"], a["bbox_units_per_um"], *a["bbox_center_um"]]

        def image(name: str):
            return torch.from_numpy(out[name]).permute(0, 3, 1, 2)

        crops = {"spot_image": image("spot_patches"), "niche_image": image("niche_patches")} if self.images else {}
        return {
            **crops, "spot_expr": torch.from_numpy(expr), "niche_expr": torch.from_numpy(niche_expr),
            "niche_spot_expr": torch.from_numpy(spot_expr), "niche_spot_coords": torch.from_numpy(coords),
            "niche_spot_mask": torch.from_numpy(mask), "coords_um": torch.from_numpy(xy),
            "stofm_units_per_um": torch.from_numpy(scalars[:, 0].copy()),
            "stofm_bbox_units_per_um": torch.from_numpy(scalars[:, 1].copy()),
            "stofm_bbox_center_um": torch.from_numpy(scalars[:, 2:].copy()),
            "slide_idx": torch.from_numpy(slide.astype(np.int64)), "index": torch.from_numpy(g.copy()),
        }

    def _by_slide(self) -> dict[int, np.ndarray]:
        """Selected spots grouped by slide: slide number -> (positions in the dataset, rows in the shard)."""
        slide = self.slide_numbers()
        return {int(k): np.flatnonzero(slide == k) for k in np.unique(slide)}

    def expression_matrix(self) -> np.ndarray:
        """``expr`` of every selected spot, (len(ds), G) float32, in dataset order."""
        out = np.empty((len(self), len(self.genes)), dtype=np.float32)
        for k, pos in self._by_slide().items():
            out[pos] = self._arrays(k)["expr"][self._indices[pos] - self._offsets[k]]
        return out

    def slide_spots(self, slide_idx: int) -> dict[str, np.ndarray]:
        """The selected spots of one slide (held-out spots excluded): ``coords_um`` (n, 2) float64 and ``expr``
        (n, G) float32, in shard order; ``IndexError`` when the slide has no spot in this dataset."""
        pos = self._by_slide().get(int(slide_idx))
        if pos is None:
            raise IndexError(f"slide {slide_idx} has no spots in this dataset")
        rows = self._indices[pos] - self._offsets[slide_idx]
        a = self._arrays(int(slide_idx))
        return {"coords_um": a["coords_um"][rows].astype(np.float64), "expr": a["expr"][rows].astype(np.float32)}


def collate(items: Sequence[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
    """Stack a list of ``ShardDataset`` items into a batch dict of tensors."""
    import torch

    if isinstance(items, dict):  # a batch ``ShardDataset.__getitems__`` already collated
        return items
    if not items:
        raise ValueError("cannot collate an empty batch")
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def split_indices(ds: ShardDataset, *, val_fraction: float, by: str = "spot", seed: int = 0,
                  max_val: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Global indices (train, val) of ``ds``'s spots for ``ShardDataset(root, indices=...)``; ``val`` holds the
    spots scored in validation, at most ``max_val`` of them (0: no cap).

    - ``by="spot"``: random spots; their niche crops and neighbours still overlap training spots. Every spot is
      in one of the two sets.
    - ``by="block"``: square blocks (2 × niche_um wide) of every slide are held out (close to ``val_fraction`` of
      the spots); with a cap, whole blocks are scored in their drawn order and the last one from its centre out.
      Training spots closer than niche_um (in x or y) to a scored spot are left out of both sets, so no training
      crop, niche mean or neighbour overlaps a scored spot; every other spot (held-out ones beyond the cap
      included) is trained on.
    - ``by="slide"``: whole slides are held out; nothing of a validation slide is seen in training, so the spots
      of held-out slides beyond the cap (a random sample is scored) are in neither set.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_val < 0:
        raise InputError(f"val_max_spots must be >= 0, got {max_val}")
    rng = np.random.default_rng(seed)
    idx = ds.indices
    if by == "spot":
        if len(idx) < 2:
            raise InputError("need at least two spots to split")
        perm = rng.permutation(len(idx))
        n_val = min(len(idx) - 1, max(1, round(val_fraction * len(idx))), max_val or len(idx))
        val = np.sort(idx[perm[:n_val]])
        return np.sort(idx[perm[n_val:]]), val
    if by == "slide":
        slides = np.asarray(sorted(ds._by_slide()))
        if len(slides) < 2:
            raise InputError("a split by slide needs at least two slides")
        n_val = min(len(slides) - 1, max(1, round(val_fraction * len(slides))))
        val_slides = rng.permutation(slides)[:n_val]
        owner = ds._slide_number(idx)
        in_val = np.isin(owner, val_slides)
        val = idx[in_val]
        if max_val and len(val) > max_val:
            val = np.sort(np.random.default_rng(seed).choice(val, size=max_val, replace=False))
        return idx[~in_val], val
    if by == "block":
        return _split_blocks(ds, val_fraction=val_fraction, rng=rng, max_val=max_val)
    raise InputError(f"by must be 'spot', 'block' or 'slide', got {by!r}")


def _block_grid(ds: ShardDataset) -> tuple[float, list, list]:
    """niche_um; per slide (global indices, µm coordinates, block key per spot) on square blocks 2 × niche_um
    wide; the sorted (slide, *block) keys."""
    niche = float(ds.manifest["niche_um"])
    groups = []
    for k, pos in ds._by_slide().items():
        g = ds._indices[pos]
        xy = ds._arrays(k)["coords_um"][g - ds._offsets[k]].astype(np.float64)
        groups.append((g, xy, np.floor((xy - xy.min(0)) / (2 * niche)).astype(np.int64)))
    blocks = sorted({(i, *b) for i, (_, _, keys) in enumerate(groups) for b in map(tuple, keys)})
    return niche, groups, blocks


def _outside_margin(groups: list, held: np.ndarray, niche: float) -> np.ndarray:
    """Sorted global indices not in ``held`` and farther than ``niche`` (in x or y) from every held spot of
    their slide."""
    from scipy.spatial import cKDTree

    train = []
    for g, xy, _ in groups:
        scored = np.isin(g, held)
        near = np.zeros(int((~scored).sum()), dtype=bool)
        if scored.any():
            near = cKDTree(xy[scored]).query(xy[~scored], p=np.inf, distance_upper_bound=niche)[0] < np.inf
        train.append(g[~scored][~near])
    return np.sort(np.concatenate(train))


def block_folds(ds: ShardDataset, *, n_splits: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Spatial k-fold: the square blocks (2 × niche_um) of every slide, in a seeded random order, go each to the
    fold holding the fewest spots so far, so every spot is tested exactly once; each fold's training spots are
    the others farther than niche_um (in x or y) from its test spots, as in ``split_indices(by="block")``."""
    if n_splits < 2:
        raise InputError(f"block folds need n_splits >= 2, got {n_splits}")
    niche, groups, blocks = _block_grid(ds)
    if len(blocks) < n_splits:
        raise InputError(f"the {len(ds)} spots lie in {len(blocks)} blocks of {2 * niche:g} µm, fewer than the "
                         f"{n_splits} folds")
    sizes = {b: 0 for b in blocks}
    for i, (_, _, keys) in enumerate(groups):
        for b in map(tuple, keys):
            sizes[(i, *b)] += 1
    load, fold_of = np.zeros(n_splits, dtype=np.int64), {}
    for j in np.random.default_rng(seed).permutation(len(blocks)):
        f = int(np.argmin(load))
        fold_of[blocks[j]] = f
        load[f] += sizes[blocks[j]]
    fold = np.concatenate([[fold_of[(i, *b)] for b in map(tuple, keys)] for i, (_, _, keys) in enumerate(groups)])
    spots = np.concatenate([g for g, _, _ in groups])
    out = []
    for f in range(n_splits):
        test = np.sort(spots[fold == f])
        out.append((_outside_margin(groups, test, niche), test))
    return out


def _split_blocks(ds: ShardDataset, *, val_fraction: float, rng: np.random.Generator,
                  max_val: int) -> tuple[np.ndarray, np.ndarray]:
    niche, groups, blocks = _block_grid(ds)
    if len(blocks) < 2:
        raise InputError(f"the {len(ds)} spots lie in a single {2 * niche:g} µm block; split by spot or by slide")
    n_val = min(len(blocks) - 1, max(1, round(val_fraction * len(blocks))))
    rank = {blocks[j]: r for r, j in enumerate(rng.permutation(len(blocks))[:n_val])}  # held blocks, drawn order
    # held-out spots in scoring order: block rank, then distance from the block centre (a capped last block is
    # a compact patch), then index
    held = []
    for i, (g, xy, keys) in enumerate(groups):
        r = np.asarray([rank.get((i, *b), -1) for b in map(tuple, keys)], dtype=np.int64)
        centre = xy.min(0) + (keys + 0.5) * 2 * niche
        held.append(np.stack([r, np.hypot(*(xy - centre).T), g])[:, r >= 0])
    order = np.concatenate(held, axis=1)
    order = order[:, np.lexsort(order[::-1])]
    val_idx = np.sort(order[2, : max_val or order.shape[1]].astype(np.int64))
    train_idx = _outside_margin(groups, val_idx, niche)
    if len(train_idx) == 0:
        raise InputError(f"a split by block of {len(ds)} spots left no training spot outside the {niche:g} µm "
                         "margin around the validation blocks; use a smaller val_fraction or split by spot")
    return train_idx, val_idx
