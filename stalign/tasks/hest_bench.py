"""The HEST-Benchmark exactly as HEST runs it, on HEST-Bench's own data layout, so rows compare with its leaderboard.

A task folder (e.g. ``bench_data/IDC``) holds ``var_50genes.json`` (``{"genes": [...]}``), ``splits/train_i.csv`` /
``test_i.csv`` (columns ``sample_id``, ``patches_path``, ``expr_path``, relative to the task folder), patch files
(HDF5: ``img`` (N, 224, 224, 3) uint8, ``barcode``, ``coords``) and expression files (AnnData). The protocol (HEST's
``benchmark.py`` / ``trainer.py``): embed each sample's patches; expression = ``log1p`` of the raw values of the
task's genes at the patch barcodes (no library-size normalisation); per split, StandardScaler + PCA(256,
random_state=1) fitted on the training spots, then Ridge(lsqr, alpha = 100 / (features x genes), no intercept,
random_state=1); Pearson r per gene over the split's test spots (pooled over its slides), averaged over genes;
the task's score is the mean (and population std) of the per-split means.

Variants, labelled in the table and not comparable with the leaderboard: ``pca=False`` (ridge on the raw
features), ``tuned_alpha=True`` (RidgeCV over 100/(F*G) x 10^-2..10^2 on the training spots), ``per_slide=True``
(Pearson per test slide, then averaged).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.hest_bench_io import read_patches
from stofm.util.errors import InputError

SEED = 1  # HEST's default seed


def read_task(root: str | os.PathLike, *, gene_list: str = "var_50genes.json") -> dict[str, Any]:
    """The genes and the (train, test) split tables of one HEST-Bench task folder."""
    import pandas as pd

    root = Path(root)
    genes_file, split_dir = root / gene_list, root / "splits"
    if not genes_file.is_file() or not split_dir.is_dir():
        raise FileNotFoundError(f"{root}: not a HEST-Bench task folder (needs {gene_list} and splits/)")
    from stofm.util.safe_files import read_json

    genes = read_json(genes_file, what="HEST-Bench gene list")
    if not isinstance(genes, dict) or not isinstance(genes.get("genes"), list) or not genes["genes"]:
        raise InputError(f"{genes_file}: expected {{\"genes\": [...]}}")
    splits, i = [], 0
    while (split_dir / f"train_{i}.csv").is_file() and (split_dir / f"test_{i}.csv").is_file():
        splits.append(tuple(pd.read_csv(split_dir / f"{kind}_{i}.csv") for kind in ("train", "test")))
        i += 1
    if not splits:
        raise FileNotFoundError(f"{split_dir}: no train_0.csv / test_0.csv")
    for df in (d for pair in splits for d in pair):
        missing = {"sample_id", "patches_path", "expr_path"} - set(df.columns)
        if missing:
            raise InputError(f"{split_dir}: split tables need columns sample_id, patches_path, expr_path "
                             f"(missing {sorted(missing)})")
    return {"name": root.name, "root": root, "genes": [str(g) for g in genes["genes"]], "splits": splits}


def sample_expression(path: str | os.PathLike, genes: Sequence[str], barcodes: Sequence[str]) -> np.ndarray:
    """log1p of the raw values of ``genes`` at ``barcodes`` (HEST's ``load_adata(normalize=True)``)."""
    from stofm.util.safe_files import read_h5ad

    adata = read_h5ad(path, what="HEST-Bench expression file")
    missing = [g for g in genes if g not in adata.var_names]
    absent = [b for b in barcodes if b not in adata.obs_names]
    if missing or absent:
        raise InputError(f"{path}: lacks genes {missing[:5]} / barcodes {absent[:3]} of the patch file")
    x = adata[list(barcodes)][:, list(genes)].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    return np.log1p(x.astype(np.float64))


def pearson_columns(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Pearson r per column, NaN where either side is constant (as ``scipy.stats.pearsonr``)."""
    from scipy.stats import pearsonr

    out = np.full(y.shape[1], np.nan)
    for j in range(y.shape[1]):
        if np.ptp(y[:, j]) > 0 and np.ptp(p[:, j]) > 0:
            out[j] = pearsonr(y[:, j], p[:, j])[0]
    return out


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, pca: bool = True, latent_dim: int = 256,
          tuned_alpha: bool = False) -> np.ndarray:
    """HEST's linear probe (see module doc); ``pca``/``tuned_alpha`` are the labelled variants."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge, RidgeCV
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if pca:
        if latent_dim > min(x_train.shape):
            raise InputError(f"PCA-{latent_dim} needs at least {latent_dim} training spots and features (have "
                             f"{x_train.shape[0]} x {x_train.shape[1]}); lower --latent-dim or use --no-pca")
        pipe = Pipeline([("scaler", StandardScaler()), ("PCA", PCA(n_components=latent_dim, random_state=SEED))])
        x_train, x_test = pipe.fit_transform(x_train), pipe.transform(x_test)
        x_train, x_test = np.float32(x_train), np.float32(x_test)  # HEST wraps them in float32 tensors
    alpha = 100 / (x_train.shape[1] * y_train.shape[1])
    if tuned_alpha:
        reg = RidgeCV(alphas=alpha * np.logspace(-2, 2, 9), fit_intercept=False).fit(x_train, y_train)
    else:
        reg = Ridge(solver="lsqr", alpha=alpha, random_state=SEED, fit_intercept=False, max_iter=1000)
        reg.fit(x_train, y_train)
    return reg.predict(x_test)


def run_task(task: dict[str, Any], features: dict[str, np.ndarray], *, pca: bool = True, latent_dim: int = 256,
             tuned_alpha: bool = False, per_slide: bool = False) -> dict[str, Any]:
    """Per-split Pearson means and the task score for one encoder, ``features``: sample_id -> (N, F) in patch order."""
    genes, means = task["genes"], []
    for train_df, test_df in task["splits"]:
        data = {}
        for kind, df in (("train", train_df), ("test", test_df)):
            xs, ys, slides = [], [], []
            for _, row in df.iterrows():
                sid = str(row["sample_id"])
                _, barcodes = read_patches(task["root"] / row["patches_path"])
                xs.append(features[sid])
                ys.append(sample_expression(task["root"] / row["expr_path"], genes, barcodes))
                slides += [sid] * len(barcodes)
            data[kind] = (np.concatenate(xs), np.concatenate(ys), np.asarray(slides))
        pred = probe(data["train"][0], data["train"][1], data["test"][0], pca=pca, latent_dim=latent_dim,
                     tuned_alpha=tuned_alpha)
        y, slides = data["test"][1], data["test"][2]
        if per_slide:
            r = np.nanmean([np.nanmean(pearson_columns(y[slides == s], pred[slides == s])) for s in np.unique(slides)])
        else:
            r = float(np.mean(pearson_columns(y, pred)))  # HEST: np.mean (a constant gene makes the split NaN)
        means.append(float(r))
    return {"pearson_mean": float(np.mean(means)), "pearson_std": float(np.std(means)), "per_split": means}


def hest_bench(root: str | os.PathLike, encoders: Sequence[str], *, pca: bool = True, latent_dim: int = 256,
               tuned_alpha: bool = False, per_slide: bool = False, batch_size: int = 32, device: str | None = None,
               arch: str | None = None, progress: bool = True):
    """A table (pandas) of the HEST-Bench score of every encoder spec on the task folder ``root``."""
    import pandas as pd

    task = read_task(root)
    samples = {}
    for train_df, test_df in task["splits"]:
        for df in (train_df, test_df):
            for _, row in df.iterrows():
                samples[str(row["sample_id"])] = task["root"] / row["patches_path"]
    variant = ", ".join(v for v, on in (("no PCA", not pca), ("tuned alpha", tuned_alpha),
                                        ("per-slide Pearson", per_slide)) if on) or "HEST protocol"
    from stalign.models.image_encoders import create_image_encoder
    from stalign.tasks.embed import default_device

    device = default_device(device)
    rows = []
    for spec in encoders:
        net = create_image_encoder(spec, pretrained=True, arch=arch).to(device).eval()
        feats = {sid: patch_features(net, path, batch_size=batch_size, device=device, progress=progress)
                 for sid, path in samples.items()}
        res = run_task(task, feats, pca=pca, latent_dim=latent_dim, tuned_alpha=tuned_alpha, per_slide=per_slide)
        rows.append({"task": task["name"], "encoder": spec, "pearson_mean": res["pearson_mean"],
                     "pearson_std": res["pearson_std"], "splits": len(res["per_split"]), "variant": variant,
                     "per_split": ";".join(f"{v:.4f}" for v in res["per_split"])})
    return pd.DataFrame(rows)


def patch_features(net: Any, path: Path, *, batch_size: int = 32, device: Any = "cpu",
                   progress: bool = True) -> np.ndarray:
    """(N, F) features of the patches of one HEST patch file through an image encoder (resizing and
    normalisation happen inside it)."""
    import torch
    from tqdm import tqdm

    img, _ = read_patches(path)
    out = []
    with torch.inference_mode():
        for s in tqdm(range(0, len(img), batch_size), desc=f"features {path.stem}", disable=not progress):
            x = torch.from_numpy(img[s:s + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
            out.append(net(x).float().cpu().numpy())
    return np.concatenate(out)
