"""How much colour alone, and how much the true morphology, explains of synth v3 expression within a slide and
across sites (``stalign data synth --version 3 --sites N --site-report``; the table in docs/synth.md).

Predictors, each a ridge regression (features standardised on the training spots, alpha by generalised
cross-validation) of log1p(CP10k) expression, scored as the mean per-gene Pearson r on the test spots:

- **colour**: colour statistics (``stalign.tasks.baselines.colour_features``: RGB and optical-density mean, std,
  10/50/90th percentiles, bright fraction) of the 112 µm spot crop and the 336 µm niche crop, read from level 0;
- **true morphology**: the generator's own per-spot truth of what the image shows (``synth_truth.niche_features``:
  class one-hot, nuclear area fraction, lumen fraction, capillaries, 300 µm class composition, the neighbours'
  classes and nuclear area, class contrast across the spot) -- the ceiling for a morphology-aware image model.

Splits: **within a slide** (5 stripes along x, each predicted from the other four; mean over slides), **another
slide of the same site** (train on one slide, test on each other slide of its site) and **an unseen site**
(train on every slide of the other sites, test on the held-out site's slides; each site held out once).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stofm.util.errors import InputError

SPOT_UM, NICHE_UM = 112.0, 336.0
PREDICTORS = ("colour statistics (spot + niche crops)", "true morphology (generator's truth)")
SPLITS = ("within slide", "other slide, same site", "unseen site")


@dataclass
class SlideData:
    """One v3 slide's tissue spots: site, both feature sets, expression and which genes are spot/context-driven."""

    slide_id: str
    site: str
    x_um: np.ndarray
    features: dict[str, np.ndarray]  # predictor name -> (N, F)
    expr: np.ndarray  # (N, G) log1p CP10k
    gene_sets: dict[str, np.ndarray]  # "spot" / "context" -> bool (G,)


def _crops_colour(image: np.ndarray, centres_px: np.ndarray, width_px: int, stride: int) -> np.ndarray:
    from stalign.tasks.baselines import colour_features

    h = width_px // 2
    padded = np.pad(image, ((h, h), (h, h), (0, 0)), mode="constant", constant_values=255)
    out = []
    for lo in range(0, len(centres_px), 64):
        crops = [padded[int(y):int(y) + 2 * h:stride, int(x):int(x) + 2 * h:stride]
                 for x, y in np.round(centres_px[lo:lo + 64]).astype(np.int64)]
        out.append(colour_features(np.stack(crops)))
    return np.concatenate(out)


def slide_data(slide) -> SlideData:
    """Colour features (from the TIFF) and true morphology features of a synth v3 slide's tissue spots."""
    import anndata as ad
    import tifffile

    from stalign.lab.synth_truth import log_normalised, niche_features

    if int(slide.truth.get("version", 1)) != 3:
        raise InputError(f"{slide.paths['truth']}: synth v{slide.truth.get('version', 1)} slide; the site measures "
                         "need synth v3 (per-site stain)")
    a = ad.read_h5ad(slide.paths["adata"])
    on = a.obs["in_tissue"].to_numpy() == 1
    truth = niche_features(a)[on]
    a = a[on]
    image = tifffile.imread(slide.paths["image"], level=0)
    upp = slide.um_per_px
    centres = np.asarray(a.obsm["spatial"], float)
    colour = np.hstack([_crops_colour(image, centres, int(round(SPOT_UM / upp)), 1),
                        _crops_colour(image, centres, int(round(NICHE_UM / upp)), 2)])
    driver = a.var["driver"].astype(str).to_numpy()
    return SlideData(slide_id=slide.slide_id, site=str(slide.truth["site"]), x_um=centres[:, 0] * upp,
                     features={PREDICTORS[0]: colour, PREDICTORS[1]: truth}, expr=log_normalised(a),
                     gene_sets={"spot": driver == "spot", "context": driver == "context"})


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import RidgeCV

    mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
    model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit((x_train - mu) / sd, y_train)
    return model.predict((x_test - mu) / sd)


def _r(y: np.ndarray, pred: np.ndarray, sets: dict[str, np.ndarray]) -> dict[str, float]:
    from stalign.tasks.hest import pearson_per_gene

    r = pearson_per_gene(y, pred)
    return {name: float(np.nanmean(r[mask])) for name, mask in sets.items()}


def site_scores(data: Sequence[SlideData]) -> list[dict]:
    """One row per (predictor, split, gene set, test slide): mean per-gene Pearson r."""
    rows = []
    sites = sorted({d.site for d in data})
    for name in PREDICTORS:
        for d in data:  # within slide: 5 stripes along x
            edges = np.quantile(d.x_um, np.linspace(0, 1, 6)[1:-1])
            fold = np.searchsorted(edges, d.x_um, side="right")
            pred = np.zeros_like(d.expr)
            for f in range(5):
                te = fold == f
                pred[te] = _fit_predict(d.features[name][~te], d.expr[~te], d.features[name][te])
            rows += [_row(name, SPLITS[0], d, k, v) for k, v in _r(d.expr, pred, d.gene_sets).items()]
        for tr in data:  # another slide of the same site
            for te in (d for d in data if d.site == tr.site and d is not tr):
                pred = _fit_predict(tr.features[name], tr.expr, te.features[name])
                rows += [_row(name, SPLITS[1], te, k, v) for k, v in _r(te.expr, pred, te.gene_sets).items()]
        for held in sites if len(sites) > 1 else []:  # an unseen site
            train = [d for d in data if d.site != held]
            x = np.concatenate([d.features[name] for d in train])
            y = np.concatenate([d.expr for d in train])
            for te in (d for d in data if d.site == held):
                pred = _fit_predict(x, y, te.features[name])
                rows += [_row(name, SPLITS[2], te, k, v) for k, v in _r(te.expr, pred, te.gene_sets).items()]
    return rows


def _row(predictor: str, split: str, d: SlideData, genes: str, r: float) -> dict:
    return {"predictor": predictor, "split": split, "slide": d.slide_id, "site": d.site, "genes": genes, "r": r}


def site_report(slides: Sequence) -> str:
    """Markdown table of ``site_scores`` over synth v3 slides (``site_table``)."""
    data = [slide_data(s) for s in slides]
    return site_table(site_scores(data), data)


def site_table(rows: Sequence[dict], data: Sequence[SlideData]) -> str:
    """Mean ± std over test slides of each (predictor, gene set, split)."""
    import pandas as pd

    df = pd.DataFrame(list(rows))
    lines = [f"{len(data)} slides, {len({d.site for d in data})} sites, "
             f"{sum(len(d.expr) for d in data)} tissue spots; mean per-gene Pearson r (± std over test slides)", "",
             "| predictor | genes | " + " | ".join(SPLITS) + " |", "|---" * (len(SPLITS) + 2) + "|"]
    for name in PREDICTORS:
        for genes in ("spot", "context"):
            cells = []
            for split in SPLITS:
                v = df[(df.predictor == name) & (df.genes == genes) & (df.split == split)]["r"]
                cells.append("–" if v.empty else f"{v.mean():.3f} ± {v.std(ddof=0):.3f}")
            lines.append(f"| {name} | {genes}-driven | " + " | ".join(cells) + " |")
    return "\n".join(lines)
