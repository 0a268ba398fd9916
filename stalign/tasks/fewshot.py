"""Few-shot learning on frozen embeddings: a ridge/linear probe for expression (HEST's PCA + ridge), prototype
and logistic classifiers for region labels, and a small torch head fine-tuned on the embeddings."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.data.crop_spec import shard_crops
from stalign.tasks.ann_index import unit_rows
from stalign.tasks.hest import RidgeProbe
from stalign.tasks.retrieval import gene_indices
from stofm.util.errors import InputError
from stofm.util.safe_files import require_path


class ExpressionProbe:
    """Ridge probe embeddings -> expression over ``genes`` (HEST's PCA + ridge; intercept on by default so
    that MSE/MAE are meaningful, ``fit_intercept=False`` for HEST's exact probe)."""

    kind = "ridge"

    def __init__(self, *, genes: Sequence[str], latent_dim: int | None = 256, alpha: float | None = None,
                 fit_intercept: bool = True, seed: int = 1) -> None:
        self.genes = [str(g) for g in genes]
        self.probe = RidgeProbe(latent_dim=latent_dim, alpha=alpha, fit_intercept=fit_intercept, seed=seed)

    def fit(self, embeddings: np.ndarray, expression: np.ndarray) -> ExpressionProbe:
        expression = np.asarray(expression)
        if expression.shape[1] != len(self.genes):
            raise InputError(f"expression has {expression.shape[1]} genes, the probe {len(self.genes)}")
        self.probe.fit(embeddings, expression)
        return self

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return self.probe.predict(embeddings).astype(np.float32)


class PrototypeClassifier:
    """Nearest class mean by cosine similarity of L2-normalised embeddings."""

    kind = "prototype"

    def __init__(self, *, temperature: float = 0.1) -> None:
        self.temperature = temperature
        self.classes_: np.ndarray | None = None
        self.prototypes_: np.ndarray | None = None

    def fit(self, embeddings: np.ndarray, labels: Sequence[Any]) -> PrototypeClassifier:
        x = unit_rows(embeddings, np.float64)
        labels = np.asarray(labels)
        self.classes_ = np.unique(labels)
        self.prototypes_ = unit_rows(np.stack([x[labels == c].mean(0) for c in self.classes_]), np.float64)
        return self

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        if self.prototypes_ is None:
            raise RuntimeError("PrototypeClassifier.predict before fit")
        logits = unit_rows(embeddings, np.float64) @ self.prototypes_.T / self.temperature
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(embeddings).argmax(1)]


class LogisticProbe:
    """Standardised embeddings -> multinomial logistic regression (sklearn)."""

    kind = "logistic"

    def __init__(self, *, c: float = 1.0, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))

    def fit(self, embeddings: np.ndarray, labels: Sequence[Any]) -> LogisticProbe:
        self.model.fit(np.asarray(embeddings, np.float64), np.asarray(labels))
        return self

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.predict_proba(np.asarray(embeddings, np.float64))

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.predict(np.asarray(embeddings, np.float64))

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_


class ExpressionHead:
    """A small MLP (LayerNorm -> Linear -> GELU -> Linear) trained on frozen embeddings to predict expression."""

    kind = "head"

    def __init__(self, *, genes: Sequence[str], hidden: int = 256, dropout: float = 0.1) -> None:
        self.genes = [str(g) for g in genes]
        self.hidden, self.dropout = hidden, dropout
        self.net: Any = None
        self.history: list[float] = []

    def build(self, in_dim: int):
        from torch import nn

        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, self.hidden), nn.GELU(),
                                 nn.Dropout(self.dropout), nn.Linear(self.hidden, len(self.genes)))
        return self.net

    def fit(self, embeddings: np.ndarray, expression: np.ndarray, *, epochs: int = 200, lr: float = 3e-3,
            weight_decay: float = 1e-2, batch_size: int = 256, seed: int = 0) -> ExpressionHead:
        """Adam-W on MSE; the output bias starts at the training mean."""
        import torch

        torch.manual_seed(seed)
        x = torch.as_tensor(np.asarray(embeddings, np.float32))
        y = torch.as_tensor(np.asarray(expression, np.float32))
        if y.shape[1] != len(self.genes):
            raise InputError(f"expression has {y.shape[1]} genes, the head {len(self.genes)}")
        net = self.build(x.shape[1])
        with torch.no_grad():
            net[-1].bias.copy_(y.mean(0))
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            total = 0.0
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                loss = torch.nn.functional.mse_loss(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            self.history.append(total / len(x))
        net.eval()
        return self

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        import torch

        if self.net is None:
            raise RuntimeError("ExpressionHead.predict before fit")
        with torch.no_grad():
            return self.net(torch.as_tensor(np.asarray(embeddings, np.float32))).numpy()


def head_predict(head: Any, embeddings: np.ndarray, genes: Sequence[str] | None = None) -> np.ndarray:
    """Expression of ``genes`` (default: all the head's genes, in its order) from an expression head."""
    if not hasattr(head, "genes"):
        raise InputError(f"a {head.kind} head predicts labels, not expression")
    pred = head.predict(embeddings)
    return pred if genes is None else pred[:, gene_indices(head.genes, list(genes), what="the few-shot head")]


def few_shot_accuracy(classifier_factory: Any, embeddings: np.ndarray, labels: Sequence[Any], *, shots: int,
                      repeats: int = 10, seed: int = 0) -> dict[str, float]:
    """Accuracy when ``shots`` labelled spots per class train a classifier and the rest are tested."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = [c for c in np.unique(labels) if (labels == c).sum() > shots]
    if len(classes) < 2:
        raise SpotLabelsError(f"need two classes with more than {shots} spots each")
    mask = np.isin(labels, classes)
    accs = []
    for _ in range(repeats):
        train = np.concatenate([rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in classes])
        test = np.setdiff1d(np.flatnonzero(mask), train)
        clf = classifier_factory().fit(embeddings[train], labels[train])
        accs.append(float((clf.predict(embeddings[test]) == labels[test]).mean()))
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)), "shots": shots,
            "n_classes": len(classes)}


def finetune_expression(model: Any, root: str | Path, *, genes: Sequence[str] | None = None, unfreeze_last: int = 0,
                        indices: Sequence[int] | None = None, hidden: int = 256, epochs: int = 5, lr: float = 1e-3,
                        encoder_lr: float = 1e-5, batch_size: int = 16, workers: int = 0, device: str | None = None,
                        niche_weight: float = 0.5, seed: int = 0, progress: bool = True) -> ExpressionHead:
    """Train an ``ExpressionHead`` end to end on shard crops through ``model.encode_image``: encoders frozen
    (``unfreeze_last=0``) or the last ``unfreeze_last`` blocks of both image trunks trained at ``encoder_lr``.
    ``model`` is updated in place (save it with the head: ``stalign.models.factory.save_checkpoint``)."""
    import torch
    from tqdm import tqdm

    from stalign.data.dataset import ShardDataset, collate
    from stalign.models.adapters import unfreeze_last_blocks
    from stalign.models.perf import resolve_device

    ds = ShardDataset(root, indices=indices)
    crops = shard_crops(ds.manifest, root, model)
    model.check_genes(ds.genes, source=f"the shards under {root}")
    genes = list(ds.genes) if genes is None else [str(g) for g in genes]
    cols = torch.as_tensor(gene_indices(ds.genes, genes, what="the shards"))
    torch.manual_seed(seed)
    device = resolve_device(device)
    model.requires_grad_(False)
    trunks = {id(m.trunk): m.trunk for m in (model.spot_image_encoder, model.niche_image_encoder)}.values()
    if unfreeze_last:
        for trunk in trunks:
            unfreeze_last_blocks(trunk, unfreeze_last)
    head = ExpressionHead(genes=genes, hidden=hidden)
    net = head.build(model.config.embed_dim)
    with torch.no_grad():
        net[-1].bias.copy_(torch.as_tensor(ds.expression_matrix())[:, cols].mean(0))
    model.to(device).eval()  # batch-norm statistics and dropout stay as trained (small few-shot batches)
    net.to(device).train()
    encoder_params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": net.parameters(), "lr": lr}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": encoder_lr})
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(seed),
                                         drop_last=len(ds) > batch_size)
    for _ in tqdm(range(epochs), desc="fine-tuning", disable=not progress):
        total, n = 0.0, 0
        for batch in loader:
            emb = model.encode_image(batch["spot_image"].to(device), batch["niche_image"].to(device),
                                     niche_weight=niche_weight)
            loss = torch.nn.functional.mse_loss(net(emb), batch["spot_expr"][:, cols].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * len(emb), n + len(emb)
        head.history.append(total / n)
    net.cpu().eval()
    head.embedding_info = {**crops.to_dict(), "unfreeze_last": unfreeze_last}
    return head


class SpotLabelsError(InputError):
    """A region-label file that cannot be matched to the shard spots or cannot train a classifier."""


def read_spot_labels(path: str | Path, shards: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Shard spot indices (dataset order, for ``embed_shards(indices=)``) and their labels from a CSV with
    columns ``barcode,label`` (or ``slide_id,barcode,label`` when the shards hold several slides).
    Spots without a label (an empty cell, or one of :data:`MISSING_LABELS`, with a warning that counts them) are
    left out; no labelled spot, barcodes not in the shards, one class only, or a class of fewer than two spots are
    errors naming the file."""
    import pandas as pd

    from stalign.data.shards import read_manifest, read_shard

    path = require_path(path, "labels file")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)  # only empty cells are missing, said below
    slides = read_manifest(shards)["slides"]
    keys = ["slide_id", "barcode"] if "slide_id" in table.columns else ["barcode"]
    if not {"barcode", "label"} <= set(table.columns):
        raise SpotLabelsError(f"{path}: the CSV needs columns barcode,label (or slide_id,barcode,label), "
                              f"found {list(table.columns)}")
    if len(slides) > 1 and "slide_id" not in table.columns:
        raise SpotLabelsError(f"{path}: the shards hold {len(slides)} slides; add a slide_id column")
    table = _labelled(table, path)
    spots = pd.concat([pd.DataFrame({"slide_id": s["slide_id"], "barcode": read_shard(Path(shards) / s["shard"])
                                     ["barcodes"]}) for s in slides], ignore_index=True)
    spots["index"] = np.arange(len(spots))
    if table.duplicated(keys).any():
        twice = table[table.duplicated(keys)]["barcode"].head(5).tolist()
        raise SpotLabelsError(f"{path}: spots labelled twice, e.g. {twice}")
    merged = table.merge(spots, on=keys, how="left")
    unknown = merged[merged["index"].isna()]
    if len(unknown):
        raise SpotLabelsError(f"{path}: {len(unknown)} labelled barcodes are not spots of the shards under {shards}, "
                              f"e.g. {unknown['barcode'].head(5).tolist()}")
    merged = merged.sort_values("index")
    labels = merged["label"].to_numpy(str)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        raise SpotLabelsError(f"{path}: {len(labels)} labelled spots but only one class ({str(classes[0])!r}); "
                              f"a classifier needs at least two")
    if counts.min() < 2:
        raise SpotLabelsError(f"{path}: too few labelled spots: class {str(classes[counts.argmin()])!r} has only "
                              f"{counts.min()}; cross-validation needs at least 2 per class")
    return merged["index"].to_numpy(np.int64), labels


#: label cells read as "no label" (R's and pandas' spellings of a missing value), case-insensitive
MISSING_LABELS = ("", "na", "n/a", "nan", "none", "null", "<na>")


def _labelled(table: Any, path: Path) -> Any:
    """The rows of ``table`` with a label; rows whose label is one of :data:`MISSING_LABELS` are left out with a
    warning naming how many and which spellings; no label at all is an error."""
    import warnings

    text = table["label"].astype(str).str.strip()
    missing = text.str.lower().isin(MISSING_LABELS)
    words = sorted(set(text[missing & (text != "")]))
    if words:
        warnings.warn(f"{path}: {int((missing & (text != '')).sum())} spots labelled {', '.join(map(repr, words))} "
                      "are read as unlabelled and left out", stacklevel=3)
    if missing.all():
        raise SpotLabelsError(f"{path}: none of its {len(table)} rows has a label (empty or "
                              f"{'/'.join(w for w in MISSING_LABELS if w)}); a classifier needs labelled spots")
    return table.assign(label=text)[~missing]


def cross_validate_labels(factory: Any, embeddings: np.ndarray, labels: Sequence[Any], *,
                          seed: int = 0) -> dict[str, float]:
    """Stratified k-fold (k = min(5, smallest class size)) accuracy and balanced accuracy of ``factory()``,
    next to the majority class of each training fold (the baseline)."""
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    k = int(min(5, np.unique(labels, return_counts=True)[1].min()))
    pred, base = np.empty_like(labels), np.empty_like(labels)
    for train, test in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(embeddings, labels):
        pred[test] = factory().fit(embeddings[train], labels[train]).predict(embeddings[test])
        values, counts = np.unique(labels[train], return_counts=True)
        base[test] = values[counts.argmax()]
    return {"n_folds": k, "n_spots": len(labels), "n_classes": len(np.unique(labels)),
            "accuracy": float((pred == labels).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
            "baseline_accuracy": float((base == labels).mean()),
            "baseline_balanced_accuracy": float(balanced_accuracy_score(labels, base))}
