"""Reading the ground truth of synthetic slides back: gene sets and per-spot domains (``truth_of``), and how much
of each gene programme's variance its driver explains (``programme_variance``, ``driver_visibility``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stofm.util.errors import InputError

SPOT_FEATURES = "class one-hot, nuclear_area_fraction, hole_fraction, vessels_in_spot"
NICHE_FEATURES = ("the spot features + comp300_<class>, vessels_in_context, ring-1 neighbours' mean class one-hot "
                  "and nuclear_area_fraction, half_contrast within 2.1 pitch")


@dataclass(frozen=True)
class SynthTruth:
    """Ground truth of synthetic slides (v2): gene sets by driver, and per-spot truth for each slide.

    ``genes``: the genes in panel order (a shard folder's panel, or the h5ad's ``var``); ``spot_genes`` /
    ``context_genes`` / ``housekeeping_genes``: subsets of ``genes`` by ``var['driver']``; ``programme``:
    gene -> programme name; ``spots``: slide id -> DataFrame of the h5ad's ``obs`` (``domain``, ``domain_idx``,
    ``comp300_*``, ``boundary_distance_um``, ``gradient``, ``ligand_score``, ...) in the order of the shard's spots
    (or of the h5ad); ``domain_names``: the domain labels (without ``background``).
    """

    version: int
    genes: list[str]
    programme: dict[str, str]
    driver: dict[str, str]
    domain_names: list[str]
    spots: dict = field(repr=False)

    def genes_by_driver(self, driver: str) -> list[str]:
        return [g for g in self.genes if self.driver[g] == driver]

    @property
    def spot_genes(self) -> list[str]:
        return self.genes_by_driver("spot")

    @property
    def context_genes(self) -> list[str]:
        return self.genes_by_driver("context")

    @property
    def housekeeping_genes(self) -> list[str]:
        return self.genes_by_driver("none")

    def domains(self, slide_id: str) -> np.ndarray:
        """Domain label of each spot of ``slide_id`` (``background`` off tissue)."""
        return self.spots[slide_id]["domain"].astype(str).to_numpy()


def truth_of(path: str | os.PathLike, *, synth_dir: str | os.PathLike | None = None) -> SynthTruth:
    """Ground truth of a synth v2 ``.h5ad`` or of a ``stalign prep`` folder made from such slides.

    For a shard folder, each slide's h5ad is found among the manifest's ``source_files`` (or as
    ``<synth_dir>/<slide_id>.h5ad``) and its ``obs`` rows are matched to the shard's spots by barcode.
    A v1 slide (no context ground truth) or a non-synthetic one raises ``ValueError``.
    """
    import anndata as ad

    p = Path(path)
    if p.is_file() and p.suffix == ".h5ad":
        a = ad.read_h5ad(p)
        sid = _check_v2(a, p)
        return _truth(a, list(map(str, a.var_names)), {sid: a.obs.copy()})
    if not (p / "manifest.json").is_file():
        raise InputError(f"{p}: neither a synthetic .h5ad nor a stalign prep folder (no manifest.json)")
    from stalign.data.shards import read_manifest, read_shard

    manifest = read_manifest(p)
    spots, first = {}, None
    for entry in manifest["slides"]:
        h5ad = _slide_h5ad(entry, synth_dir)
        a = ad.read_h5ad(h5ad)
        _check_v2(a, h5ad)
        barcodes = read_shard(p / entry["shard"])["barcodes"]
        missing = [b for b in barcodes if b not in a.obs_names]
        if missing:
            raise InputError(f"{h5ad}: {len(missing)} spots of shard {entry['shard']} are not in it "
                             f"(e.g. {missing[0]}); not the slide this shard was made from")
        spots[entry["slide_id"]] = a.obs.loc[barcodes].copy()
        first = first or a
    genes = [g for g in manifest["genes"]]
    unknown = [g for g in genes if g not in first.var_names]
    if unknown:
        raise InputError(f"{p}: genes {unknown[:3]} of the shard panel are not in the synthetic panel")
    return _truth(first, genes, spots)


def _check_v2(adata, path: Path) -> str:
    syn = adata.uns.get("synthetic")
    if syn is None:
        raise InputError(f"{path}: not a synthetic slide (no uns['synthetic'])")
    version = int(syn.get("version", 1))
    if version < 2 or "driver" not in adata.var or "domain" not in adata.obs:
        raise InputError(f"{path}: made by synth v{version}, which has no context ground truth "
                         "(domains, context genes); make the slides with synth v2 (the default)")
    return str(syn["slide_id"])


def _slide_h5ad(entry: dict, synth_dir) -> Path:
    if synth_dir is not None:
        cand = Path(synth_dir) / f"{entry['slide_id']}.h5ad"
        if cand.is_file():
            return cand
        raise InputError(f"{cand}: not found (slide {entry['slide_id']!r} of the shard folder)")
    h5ads = [f for f in entry.get("source_files", {}) if f.endswith(".h5ad")]
    if not h5ads:
        raise InputError(f"slide {entry['slide_id']!r} was not read from a .h5ad, so it is not a synthetic slide")
    for f in h5ads:
        if Path(f).is_file():
            return Path(f)
    raise InputError(f"slide {entry['slide_id']!r}: its source .h5ad ({list(entry.get('source_files', {}))}) is "
                     "gone; pass synth_dir= (the folder the synthetic slides are in)")


def _truth(adata, genes: list[str], spots: dict) -> SynthTruth:
    var = adata.var
    dom = adata.obs["domain"]
    names = [str(c) for c in dom.cat.categories if c != "background"]
    return SynthTruth(version=int(adata.uns["synthetic"]["version"]), genes=genes,
                      programme={g: str(var.loc[g, "programme"]) for g in genes},
                      driver={g: str(var.loc[g, "driver"]) for g in genes}, domain_names=names, spots=spots)


def log_normalised(adata) -> np.ndarray:
    """log1p(counts / total * 1e4), dense float64."""
    x = adata.X.toarray() if hasattr(adata.X, "toarray") else np.asarray(adata.X)
    x = x.astype(np.float64)
    return np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)


def _driver_matrix(adata, gene: str) -> np.ndarray:
    """The per-spot value(s) of a gene's driver (columns of a design matrix)."""
    v = adata.var.loc[gene]
    obs = adata.obs
    var = str(v["driver_variable"])
    if var == "tissue_class":
        return (obs["tissue_class_idx"].to_numpy() == int(v["programme_class"])).astype(float)[:, None]
    if var.startswith("domain=="):
        return (obs["domain"].astype(str).to_numpy() == var[len("domain=="):]).astype(float)[:, None]
    if var == "nuclear_area_fraction":
        from stalign.lab.synth_expression import NAF_REF, NAF_SCALE

        return np.clip((obs[var].to_numpy(float) - NAF_REF) / NAF_SCALE, -4, 6)[:, None]
    return obs[var].to_numpy(float)[:, None]


def spot_features(adata) -> np.ndarray:
    """What one spot shows: its class (one-hot), nuclear area fraction, hole fraction, capillaries in its disc."""
    obs = adata.obs
    classes = adata.uns.get("synthetic", {}).get("classes")
    k = len(classes) if classes is not None else int(obs["tissue_class_idx"].max()) + 1
    onehot = (obs["tissue_class_idx"].to_numpy()[:, None] == np.arange(k)[None, :]).astype(float)
    return np.column_stack([onehot, obs["nuclear_area_fraction"].to_numpy(float), obs["hole_fraction"].to_numpy(float),
                            obs["vessels_in_spot"].to_numpy(float)])


def niche_features(adata) -> np.ndarray:
    """What a ~niche-sized crop shows: the spot features, the class composition of the 300 µm disc, its
    capillaries, the ring-1 neighbours' mean class one-hot and nuclear area fraction, and how much the class mix
    differs between the two halves of the neighbourhood (``half_contrast``: a domain border crossing the niche)."""
    from scipy.spatial import cKDTree

    own = spot_features(adata)
    xy = np.asarray(adata.obsm["spatial"], float) * float(adata.uns["synthetic"]["um_per_px"])
    pitch = float(adata.uns["synthetic"]["pitch_um"])
    pairs = cKDTree(xy).query_pairs(1.1 * pitch, output_type="ndarray")
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    n = np.maximum(np.bincount(i, minlength=len(xy)), 1)[:, None]
    ring = np.stack([np.bincount(i, weights=own[j, c], minlength=len(xy)) for c in range(own.shape[1] - 2)], 1) / n
    comp = adata.obs[[c for c in adata.obs if c.startswith("comp300_")]].to_numpy(float)
    return np.column_stack([own, comp, adata.obs["vessels_in_context"].to_numpy(float), ring,
                            half_contrast(xy, own[:, :-3], 2.1 * pitch)])


def half_contrast(xy: np.ndarray, onehot: np.ndarray, radius: float, n_directions: int = 6) -> np.ndarray:
    """(N, 2): max and mean over ``n_directions`` lines through each spot of the L1 distance between the mean class
    one-hot of the neighbours (within ``radius``) on either side of the line."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    i, j = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    d = xy[j] - xy[i]
    out = np.zeros((len(xy), n_directions))
    for k, ang in enumerate(np.arange(n_directions) * np.pi / n_directions):
        side = d @ np.array([np.cos(ang), np.sin(ang)])
        means = []
        for mask in (side > 1e-6, side < -1e-6):
            cnt = np.bincount(i[mask], minlength=len(xy))
            tot = np.stack([np.bincount(i[mask], weights=onehot[j[mask], c], minlength=len(xy))
                            for c in range(onehot.shape[1])], 1)
            means.append((tot / np.maximum(cnt, 1)[:, None], cnt > 0))
        (a, ok_a), (b, ok_b) = means
        out[:, k] = np.where(ok_a & ok_b, np.abs(a - b).sum(1), 0.0)
    return np.column_stack([out.max(1), out.mean(1)])


def cv_r2(x: np.ndarray, y: np.ndarray, *, nonlinear: bool = False, seed: int = 0) -> float | np.ndarray:
    """5-fold cross-validated R² of ``y`` from ``x`` (linear least squares, or gradient-boosted trees for a 1-d
    ``y``); a 2-d ``y`` gives one R² per column."""
    from sklearn.ensemble import HistGradientBoostingRegressor
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    model = HistGradientBoostingRegressor(max_iter=100, learning_rate=0.1, random_state=seed) if nonlinear \
        else LinearRegression()
    pred = cross_val_predict(model, x, y, cv=KFold(5, shuffle=True, random_state=seed))
    if y.ndim == 1:
        return float(r2_score(y, pred))
    return r2_score(y, pred, multioutput="raw_values")


def programme_variance(adata) -> list[dict]:
    """Per programme, on the tissue spots: mean R² of log1p-CP10k expression explained by its own driver (least
    squares on the exact driver term), and from what the spot shows vs what the niche shows (least squares on
    ``spot_features`` / ``niche_features``); all 5-fold cross-validated."""
    _check_v2(adata, Path(str(adata.uns["synthetic"]["slide_id"])))
    on = adata.obs["in_tissue"].to_numpy() == 1
    sub = adata[on]
    logx = log_normalised(sub)
    r2_spot, r2_niche = cv_r2(spot_features(sub), logx), cv_r2(niche_features(sub), logx)
    var = sub.var
    r2_driver = np.full(len(var), np.nan)
    keys = [(v, int(c), d) for v, c, d in zip(var["driver_variable"], var["programme_class"], var["driver"])]
    for key in dict.fromkeys(keys):
        if key[2] == "none":
            continue
        cols = [i for i, k in enumerate(keys) if k == key]
        r2_driver[cols] = cv_r2(_driver_matrix(sub, var.index[cols[0]]), logx[:, cols])
    rows = []
    for prog in dict.fromkeys(var["programme"]):
        sel = (var["programme"] == prog).to_numpy()
        first = var.index[sel][0]
        rows.append({"programme": prog, "driver": str(var.loc[first, "driver"]),
                     "variable": {"domain": "domain == d", "composition": "comp300_<class>"}.get(
                         prog, str(var.loc[first, "driver_variable"])),
                     "n_genes": int(sel.sum()),
                     "r2_driver": float(np.mean(r2_driver[sel])) if np.isfinite(r2_driver[sel]).all() else np.nan,
                     "r2_spot": float(np.mean(r2_spot[sel])), "r2_niche": float(np.mean(r2_niche[sel]))})
    return rows


def driver_visibility(adata) -> list[dict]:
    """For each context driver: cross-validated R² from what the spot shows vs what the niche shows (trees)."""
    on = adata.obs["in_tissue"].to_numpy() == 1
    sub = adata[on]
    fs, fn = spot_features(sub), niche_features(sub)
    out = []
    for var in ("boundary_proximity", "gradient", "ligand_score", *[c for c in sub.obs if c.startswith("comp300_")]):
        y = sub.obs[var].to_numpy(float)
        out.append({"driver": var, "r2_spot": cv_r2(fs, y, nonlinear=True), "r2_niche": cv_r2(fn, y, nonlinear=True)})
    dom = sub.obs["domain_idx"].to_numpy()
    out.append({"driver": "domain (accuracy)", "r2_spot": _cv_accuracy(fs, dom), "r2_niche": _cv_accuracy(fn, dom)})
    return out


def _cv_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.model_selection import KFold, cross_val_score

    model = HistGradientBoostingClassifier(max_iter=100, random_state=seed)
    return float(cross_val_score(model, x, y, cv=KFold(5, shuffle=True, random_state=seed)).mean())


def report(h5ad: str | os.PathLike) -> str:
    """The two tables (markdown) for one synth v2 slide."""
    import anndata as ad

    a = ad.read_h5ad(h5ad)
    lines = [f"{Path(h5ad).name}: {int((a.obs['in_tissue'] == 1).sum())} tissue spots", "",
             "| programme | driver | variable | genes | R² driver | R² spot (CV) | R² niche (CV) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in programme_variance(a):
        lines.append(f"| {r['programme']} | {r['driver']} | {r['variable']} | {r['n_genes']} | "
                     f"{_fmt(r['r2_driver'])} | {_fmt(r['r2_spot'])} | {_fmt(r['r2_niche'])} |")
    lines += ["", f"R²: 5-fold CV on log1p(CP10k); spot: {SPOT_FEATURES}; niche: {NICHE_FEATURES}", "",
              "| context driver | from the spot (CV) | from the niche (CV) |", "| --- | --- | --- |"]
    for r in driver_visibility(a):
        lines.append(f"| {r['driver']} | {_fmt(r['r2_spot'])} | {_fmt(r['r2_niche'])} |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "—" if not np.isfinite(v) else f"{v:.2f}"
