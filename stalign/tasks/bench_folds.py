"""The folds of ``stalign bench --shards`` and their gene panels, settled before any feature is extracted.

Schemes (``by``): ``"site"`` / ``"patient"`` / ``"slide"`` (leave one site / patient / slide out, or grouped
k-fold), ``"block"`` (within slides: a k-fold over square blocks, every spot tested once, with a niche-wide margin,
``stalign.data.dataset.block_folds``: no training crop, niche mean or neighbour overlaps a test spot),
``"spot"`` (random spots: neighbouring spots share tissue across train and test, so scores are inflated; the rows
say so). ``"auto"``: the strictest the shards support: by site when every slide has one and there are two or more
sites, else by patient likewise, else by slide with two or more slides, else by block (a ``--sites`` /
``--patients`` table given is used as such). A test site's slides share
stain, scanner and protocol that its training slides would otherwise share too, so a model that learnt them
scores higher on a slide of a seen site than on a new site (issue 24); HEST-Bench splits by patient for the
same reason. A slide's patient and site are its manifest entry's (``stalign prep``: ``--samples`` columns, or an
``obs`` column with one value per slide), or a table's (``--patients`` / ``--sites`` FILE), which wins.
The gene panel of each fold is chosen on its training spots only (HEST's filter per slide, then the most variable).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stalign.tasks.hest import check_no_leakage, group_splits, hest_gene_panel
from stofm.util.errors import InputError

SCHEMES = ("auto", "site", "patient", "slide", "block", "spot")
#: Where a slide's group comes from when the shards do not say (the flag of ``stalign bench``).
GROUP_FLAGS = {"patient": "--patients", "site": "--sites"}


@dataclass
class Folds:
    """(train, test) index pairs (dataset order), how they were made, and each fold's gene panel."""

    splits: list[tuple[np.ndarray, np.ndarray]]
    scheme: str
    label: str
    leaky: bool
    panels: list[list[str]]


def read_slide_groups(path: str | os.PathLike, column: str = "patient") -> dict[str, str]:
    """slide_id -> ``column`` (patient, site) from a CSV/TSV with columns ``slide_id`` and ``column``."""
    import pandas as pd

    try:
        df = pd.read_csv(path, sep=None, engine="python", dtype=str)
    except (ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a CSV/TSV table ({' '.join(str(err).split())})") from None
    if not {"slide_id", column} <= set(df.columns):
        raise InputError(f"{path}: needs columns slide_id and {column} (has {list(df.columns)})")
    empty = df.loc[df[column].isna() | (df[column].str.strip() == ""), "slide_id"].tolist()
    if empty:
        raise InputError(f"{path}: no {column} for slides {empty[:5]}")
    return dict(zip(df["slide_id"].str.strip(), df[column].str.strip()))


def shard_groups(ds: Any, kind: str, table: Mapping[str, str] | None = None) -> dict[str, str]:
    """slide_id -> ``kind`` (patient, site) of the shards' slides that have one: the manifest entry's, the
    ``table``'s where given (it wins)."""
    known = {str(e["slide_id"]): str(e[kind]) for e in ds.manifest.get("slides", []) if e.get(kind)}
    return {**known, **(table or {})}


def _group_folds(groups: np.ndarray, n_splits: int | None, what: str, root: Any) -> tuple[list, str]:
    n = len(np.unique(groups))
    if n < 2:
        raise InputError(f"{root}: one {what} only ({groups[0]}); folds by {what} need two or more (use --by "
                         f"{'block within it' if what == 'slide' else 'slide or --by block'})")
    splits = group_splits(groups, n_splits=n_splits)
    kind = f"leave-one-{what}-out" if len(splits) == n else f"{len(splits)}-fold by {what}"
    return splits, f"{kind} ({n} {what}s)"


def _block_folds(ds: Any, n_splits: int, seed: int, root: Any) -> tuple[list, str]:
    """Spatial block k-fold (``stalign.data.dataset.block_folds``): every spot tested once; a fold whose margin
    leaves fewer training than test spots is refused (fewer, larger folds or --by spot are the ways out)."""
    from stalign.data.dataset import block_folds

    one = "one slide only, and " if len(ds.slide_ids) == 1 else ""
    hint = "use fewer --folds, or --by spot for random spot folds (leaky: the rows say so)"
    niche = float(ds.manifest["niche_um"])
    try:
        splits = block_folds(ds, n_splits=n_splits, seed=seed)
    except InputError as err:
        raise InputError(f"{root}: {one}{err}; {hint}") from None
    thin = [f"fold {i + 1}: {len(tr)} training vs {len(te)} test" for i, (tr, te) in enumerate(splits)
            if len(tr) < len(te)]
    if thin:
        raise InputError(f"{root}: {one}the {niche:g} µm margin around the test blocks leaves fewer training than "
                         f"test spots ({'; '.join(thin[:3])}); {hint}")
    return splits, (f"spatial blocks ({len(splits)}-fold over {2 * niche:g} µm blocks, every spot tested once, "
                    f"{niche:g} µm margin dropped from training)")


def _groups_of_spots(slides: np.ndarray, groups: Mapping[str, str], kind: str, root: Any) -> np.ndarray:
    """The ``kind`` of every spot; a slide without one is refused, naming where it could come from."""
    missing = sorted(set(slides.tolist()) - set(groups))
    if missing:
        raise InputError(f"{root}: no {kind} for slides {missing[:5]} (a {kind} column of prep --samples, an obs "
                         f"column '{kind}' with one value per slide, or {GROUP_FLAGS[kind]} FILE with columns "
                         f"slide_id, {kind})")
    return np.asarray([groups[s] for s in slides])


def make_folds(ds: Any, *, by: str = "auto", n_splits: int | None = None, seed: int = 0,
               patients: Mapping[str, str] | None = None, sites: Mapping[str, str] | None = None,
               root: Any = None) -> tuple[list, str, str]:
    """(splits, scheme, label) for ``ShardDataset`` ``ds`` (all its spots; see module doc for ``by``; ``patients``
    / ``sites``: tables slide_id -> group over the manifest's)."""
    if by not in SCHEMES:
        raise InputError(f"by must be one of {', '.join(SCHEMES)}, got {by!r}")
    root = root or "shards"
    slides = np.asarray(ds.slide_ids)[ds.slide_numbers()]
    known = {"patient": shard_groups(ds, "patient", patients), "site": shard_groups(ds, "site", sites)}
    if by == "auto":  # a table given is used (and checked); else the groups every slide has, 2+ of them
        every = [k for k, table in (("site", sites), ("patient", patients)) if table] or [
            k for k in ("site", "patient") if set(slides.tolist()) <= set(known[k])
            and len({known[k][s] for s in set(slides.tolist())}) > 1]
        by = every[0] if every else ("slide" if len(ds.slide_ids) > 1 else "block")
    if by in ("site", "patient"):
        splits, label = _group_folds(_groups_of_spots(slides, known[by], by, root), n_splits, by, root)
    elif by == "slide":
        splits, label = _group_folds(slides, n_splits, "slide", root)
    elif by == "block":
        splits, label = _block_folds(ds, n_splits or 5, seed, root)
    else:
        n = n_splits or 5
        if n < 2 or n > len(ds):
            raise InputError(f"--folds must be in 2..{len(ds)} for random spot folds, got {n}")
        splits = group_splits(np.random.default_rng(seed).permutation(len(ds)), n_splits=n)
        label = f"random spots ({n}-fold; LEAKY: neighbouring spots share tissue across train and test)"
    if by != "spot":
        check_no_leakage(np.arange(len(ds)), splits)
    return splits, by, label


def fold_panels(expression: np.ndarray, genes: Sequence[str], slides: np.ndarray,
                splits: Sequence[tuple[np.ndarray, np.ndarray]], *, k: int | None, log1p: bool) -> list[list[str]]:
    """Each fold's genes chosen on its training spots alone (detected in >= 10% of the training spots of every
    slide, then the ``k`` most variable); all genes when ``k`` is falsy."""
    if not k:
        return [list(genes)] * len(splits)
    panels = []
    for i, (train, _) in enumerate(splits):
        try:
            panels.append(hest_gene_panel(expression[train], genes, groups=slides[train], k=k, log1p=log1p))
        except InputError as err:
            raise InputError(f"fold {i} ({len(train)} training spots): {err}; use --genes 0 for all genes") from None
    return panels


def bench_folds(ds: Any, expression: np.ndarray, *, by: str = "auto", n_splits: int | None = None, seed: int = 0,
                patients: Mapping[str, str] | None = None, sites: Mapping[str, str] | None = None,
                k_genes: int | None = 50, log1p: bool = False, root: Any = None) -> Folds:
    """The folds and per-fold gene panels of ``bench`` (no feature needed: checked before any extraction)."""
    splits, scheme, label = make_folds(ds, by=by, n_splits=n_splits, seed=seed, patients=patients, sites=sites,
                                       root=root)
    slides = np.asarray(ds.slide_ids)[ds.slide_numbers()]
    panels = fold_panels(expression, ds.genes, slides, splits, k=k_genes, log1p=log1p)
    return Folds(splits=splits, scheme=scheme, label=label, leaky=scheme == "spot", panels=panels)
