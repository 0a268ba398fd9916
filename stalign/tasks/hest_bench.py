"""The HEST-Benchmark exactly as HEST runs it, on HEST-Bench's own data layout, so rows compare with its leaderboard.

A task folder (e.g. ``bench_data/IDC``) holds ``var_50genes.json`` (``{"genes": [...]}``), ``splits/train_i.csv`` /
``test_i.csv`` (columns ``sample_id``, ``patches_path``, ``expr_path``, relative to the task folder), patch files
(HDF5: ``img`` (N, 224, 224, 3) uint8, ``barcode``, ``coords``) and expression files (AnnData). The protocol (HEST's
``benchmark.py`` / ``trainer.py``): embed each sample's patches; expression = ``log1p`` of the raw values of the
task's genes at the patch barcodes (no library-size normalisation); per split, StandardScaler + PCA(256,
random_state=1) fitted on the training spots, then Ridge(lsqr, alpha = 100 / (features x genes), no intercept,
random_state=1); Pearson r per gene over the split's test spots (pooled over its slides), averaged over genes;
the task's score is the mean (and population std) of the per-split means. MSE over the test spots is reported too.

Encoders: any ``stalign bench`` spec (``stalign.tasks.bench.PatchEncoder``): ``model:CKPT`` embeds the patches with
the checkpoint's image side (``encode_image`` of spot + niche crops where the patch files hold ``niche_img``, as
``stalign data export-hest`` writes them; else ``encode_spot_image``), ``backbone:CKPT``, ``random:SPEC``, image-encoder
specs. Baseline rows on the same splits: the training mean and colour statistics through the same recipe.

The task folder is checked before anything is embedded (one line naming the file): split files in train/test pairs
numbered from 0, their columns, train and test sharing no spot (same patch file and barcode), every patch file's
images (``stalign.data.hest_bench_io``), the expression files' genes and barcodes.

Variants, labelled in the table and not comparable with the leaderboard: ``pca=False`` (ridge on the raw
features), ``tuned_alpha=True`` (RidgeCV over 100/(F*G) x 10^-2..10^2 on the training spots), ``per_slide=True``
(Pearson per test slide, then averaged).
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.hest_bench_io import patch_file_info, read_patches
from stalign.tasks.hest import LeakageError, pearson_per_gene
from stofm.util.errors import InputError

SEED = 1  # HEST's default seed
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (x_train, y_train, x_test) -> prediction


def _split_files(split_dir: Path) -> list[int]:
    """The split numbers 0..n-1, every one with both files; a lone or out-of-sequence file is refused by name."""
    found: dict[str, set[int]] = {"train": set(), "test": set()}
    for p in split_dir.iterdir():
        m = re.fullmatch(r"(train|test)_(\d+)\.csv", p.name)
        if m:
            found[m.group(1)].add(int(m.group(2)))
    for kind, other in (("train", "test"), ("test", "train")):
        for i in sorted(found[other] - found[kind]):
            raise InputError(f"{split_dir / f'{kind}_{i}.csv'}: missing ({other}_{i}.csv exists)")
    numbers = sorted(found["train"])
    if not numbers:
        raise InputError(f"{split_dir}: no train_0.csv / test_0.csv")
    if numbers != list(range(len(numbers))):
        gap = min(set(range(len(numbers))) - set(numbers))
        raise InputError(f"{split_dir / f'train_{gap}.csv'}: missing (splits are numbered from 0; found {numbers})")
    return numbers


def read_task(root: str | os.PathLike, *, gene_list: str = "var_50genes.json") -> dict[str, Any]:
    """The genes, the (train, test) split tables and the samples (sample_id -> patch and expression file) of one
    HEST-Bench task folder."""
    import pandas as pd

    from stofm.util.safe_files import read_json

    root = Path(root)
    genes_file, split_dir = root / gene_list, root / "splits"
    if not genes_file.is_file() or not split_dir.is_dir():
        raise FileNotFoundError(f"{root}: not a HEST-Bench task folder (needs {gene_list} and splits/)")
    genes = read_json(genes_file, what="HEST-Bench gene list")
    if not isinstance(genes, dict) or not isinstance(genes.get("genes"), list) or not genes["genes"]:
        raise InputError(f"{genes_file}: expected {{\"genes\": [...]}}")
    splits, samples = [], {}
    for i in _split_files(split_dir):
        pair = []
        for kind in ("train", "test"):
            path = split_dir / f"{kind}_{i}.csv"
            df = pd.read_csv(path, dtype={"sample_id": str})
            missing = {"sample_id", "patches_path", "expr_path"} - set(df.columns)
            if missing or df.empty:
                raise InputError(f"{path}: split tables need rows with columns sample_id, patches_path, expr_path "
                                 f"(missing {sorted(missing) or 'rows'})")
            for sid, patches, expr in zip(df["sample_id"], df["patches_path"], df["expr_path"]):
                files = (root / str(patches), root / str(expr))
                if samples.setdefault(str(sid), files) != files:
                    raise InputError(f"{path}: sample {sid} names other files than in an earlier split table")
            pair.append(df)
        splits.append(tuple(pair))
    return {"name": root.name, "root": root, "genes": [str(g) for g in genes["genes"]], "splits": splits,
            "samples": samples}


def check_task(task: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """sample_id -> {"barcodes", "niche"} of every patch file (checked), after refusing splits whose train and
    test share a spot (same patch file and barcode)."""
    info = {}
    for sid, (patches, _) in task["samples"].items():
        barcodes, niche = patch_file_info(patches)
        info[sid] = {"barcodes": barcodes, "niche": niche}
    for i, (train_df, test_df) in enumerate(task["splits"]):
        def spots(df: Any) -> set[tuple[str, str]]:
            return {(str(task["samples"][str(s)][0].resolve()), b) for s in df["sample_id"]
                    for b in info[str(s)]["barcodes"]}
        shared = spots(train_df) & spots(test_df)
        if shared:
            path, barcode = sorted(shared)[0]
            raise LeakageError(f"{task['root'] / 'splits' / f'test_{i}.csv'}: {len(shared)} test spots are also in "
                               f"train_{i}.csv (e.g. {barcode} of {path}); train and test must not share spots")
    return info


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
    x = np.log1p(x.astype(np.float64))
    if not np.isfinite(x).all():
        raise InputError(f"{path}: expression of the task's genes holds NaN/inf or values below -1")
    return x


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


def run_task(task: dict[str, Any], features: dict[str, np.ndarray], expression: dict[str, np.ndarray], fit: Fit, *,
             per_slide: bool = False) -> dict[str, Any]:
    """Per-split Pearson means, MSE and the task score of one predictor ``fit`` on ``features`` (sample_id -> (N, F)
    in patch order) against ``expression`` (sample_id -> (N, G) log1p targets)."""
    means, mses = [], []
    for train_df, test_df in task["splits"]:
        data = {}
        for kind, df in (("train", train_df), ("test", test_df)):
            sids = [str(s) for s in df["sample_id"]]
            data[kind] = (np.concatenate([features[s] for s in sids]), np.concatenate([expression[s] for s in sids]),
                          np.concatenate([[s] * len(expression[s]) for s in sids]))
        pred = fit(data["train"][0], data["train"][1], data["test"][0])
        y, slides = data["test"][1], data["test"][2]
        if per_slide:
            with warnings.catch_warnings():  # a constant prediction (the training mean) has no r: NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                r = np.nanmean([np.nanmean(pearson_per_gene(y[slides == s], pred[slides == s]))
                                for s in np.unique(slides)])
        else:
            r = float(np.mean(pearson_per_gene(y, pred)))  # HEST: np.mean (a constant gene makes the split NaN)
        means.append(float(r))
        mses.append(float(((pred - y) ** 2).mean()))
    return {"pearson_mean": float(np.mean(means)), "pearson_std": float(np.std(means)), "per_split": means,
            "mse": float(np.mean(mses))}


def _mean_fit(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    return np.repeat(y_train.mean(0, keepdims=True), len(x_test), axis=0)


def hest_bench(root: str | os.PathLike, encoders: Sequence[str], *, pca: bool = True, latent_dim: int = 256,
               tuned_alpha: bool = False, per_slide: bool = False, batch_size: int = 32, device: str | None = None,
               arch: str | None = None, progress: bool = True, seed: int = 0, baselines: bool = True,
               precision: str = "auto"):
    """A table (pandas) of the HEST-Bench score (and MSE) of every encoder spec on the task folder ``root``, then
    (``baselines``) the training mean and colour statistics on the same splits; the baseline of lowest MSE is
    marked ``to_beat``. The folder is checked (``check_task``) before anything is embedded. ``precision``: ``auto``
    = each encoder's as HEST runs it (fp16 autocast for UNI, Virchow2, H-optimus-0, ...), or fp32 / fp16 / bf16;
    the ``precision`` column says what ran (``stalign.models.image_encoders.run_precision``)."""
    from functools import partial

    import pandas as pd

    from stalign.models.image_encoders import run_precision
    from stalign.models.perf import resolve_device
    from stalign.tasks.baselines import colour_features
    from stalign.tasks.bench import PatchEncoder, check_encoder_specs

    task = read_task(root)
    info = check_task(task)
    expression = {sid: sample_expression(expr, task["genes"], info[sid]["barcodes"])
                  for sid, (_, expr) in task["samples"].items()}
    check_encoder_specs(encoders)
    variant = ", ".join(v for v, on in (("no PCA", not pca), ("tuned alpha", tuned_alpha),
                                        ("per-slide Pearson", per_slide)) if on) or "HEST protocol"
    fit = partial(probe, pca=pca, latent_dim=latent_dim, tuned_alpha=tuned_alpha)
    device = resolve_device(device)
    rows = []

    def add(name: str, kind: str, feats: dict[str, np.ndarray], fit: Fit, label: str, precision: str = "") -> None:
        res = run_task(task, feats, expression, fit, per_slide=per_slide)
        rows.append({"task": task["name"], "encoder": name, "kind": kind, "pearson_mean": res["pearson_mean"],
                     "pearson_std": res["pearson_std"], "mse": res["mse"], "splits": len(res["per_split"]),
                     "variant": label, "precision": precision,
                     "per_split": ";".join(f"{v:.4f}" for v in res["per_split"])})

    for spec in encoders:
        net = PatchEncoder(spec, arch=arch, seed=seed).to(device)
        run, ran = run_precision(getattr(net.net, "precision", "fp32"), precision, device)
        niche = net.aligned and all(i["niche"] for i in info.values())
        feats = {sid: patch_features(net, path, batch_size=batch_size, device=device, progress=progress,
                                     niche=niche, precision=run) for sid, (path, _) in task["samples"].items()}
        resolved = getattr(net.net, "spec", spec)  # the name an alias stands for, e.g. resnet50 -> the whole network
        add(spec if resolved in (spec, spec.partition(":")[2]) else f"{spec} (= {resolved})", "encoder", feats, fit,
            variant + ("; spot + niche crops" if niche else "; spot crops only" if net.aligned else ""), ran)
    if baselines:
        add("mean expression (training splits)", "baseline", {s: np.zeros((len(e), 1)) for s, e in expression.items()},
            _mean_fit, "training mean")
        colour = {sid: colour_features(read_patches(path)[0]) for sid, (path, _) in task["samples"].items()}
        n = colour[next(iter(colour))].shape[1]
        add("colour stats + ridge", "baseline", colour, partial(probe, pca=pca, latent_dim=min(latent_dim, n),
                                                                tuned_alpha=tuned_alpha),
            variant + (f" (PCA-{min(latent_dim, n)}: {n} features)" if pca else ""))
    table = pd.DataFrame(rows)
    base = table[table["kind"] == "baseline"]
    table["to_beat"] = table.index == (base["mse"].idxmin() if len(base) else -1)
    return table


def patch_features(net: Any, path: Path, *, batch_size: int = 32, device: Any = "cpu",
                   progress: bool = True, niche: bool = False, precision: str = "fp32") -> np.ndarray:
    """(N, F) features of the patches of one HEST patch file through an image encoder (resizing and
    normalisation happen inside it) under ``precision`` autocast; ``niche=True``: ``net(spot, niche)`` with the
    file's ``niche_img``."""
    import torch
    from tqdm import tqdm

    from stalign.models.perf import autocast

    img, _, wide = read_patches(path, niche=True) if niche else (*read_patches(path), None)
    out = []
    with torch.inference_mode(), autocast(device, precision):
        for s in tqdm(range(0, len(img), batch_size), desc=f"features {path.stem}", disable=not progress):
            x = torch.from_numpy(img[s:s + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
            if wide is None:
                out.append(net(x).float().cpu().numpy())
            else:
                w = torch.from_numpy(wide[s:s + batch_size]).permute(0, 3, 1, 2).contiguous().to(device)
                out.append(net(x, w).float().cpu().numpy())
    return np.concatenate(out)
