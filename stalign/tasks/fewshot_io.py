"""Few-shot heads on disk without pickle: ``head.safetensors`` (arrays) + ``head.json`` (kind, genes, classes,
settings, the embedding it expects, the arrays' sha256). Loading runs no code from the folder.

A fitted ridge probe (scaler -> PCA -> ridge) and a logistic probe (scaler -> logistic regression) are affine
maps of the embedding, so they are stored as one weight matrix and bias computed from the fitted pipeline
(predictions agree with the pipeline to float64 rounding); prototype classifiers store their prototypes; the MLP
head its state dict.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stalign.tasks.fewshot import ExpressionHead, ExpressionProbe, LogisticProbe, PrototypeClassifier
from stofm.util.errors import InputError
from stofm.util.safe_files import DamagedFileError

HEAD_FORMAT = "stalign-fewshot-head"
HEAD_VERSION = 2


class AffineMap:
    """``x @ weight + bias`` in float64: what a fitted scaler/PCA/linear pipeline computes."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray) -> None:
        self.weight, self.bias = np.asarray(weight, np.float64), np.asarray(bias, np.float64)

    @classmethod
    def of(cls, fn: Any, in_dim: int) -> AffineMap:
        """The affine map of a fitted linear ``fn`` (N, in_dim) -> (N, K) or (N,), read off at 0 and the unit basis."""
        zero = np.atleast_1d(np.asarray(fn(np.zeros((1, in_dim))), np.float64)[0])
        basis = np.asarray(fn(np.eye(in_dim)), np.float64).reshape(in_dim, -1)
        return cls(basis - zero, zero)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float64) @ self.weight + self.bias


class AffineLogistic:
    """A logistic regression as decision function ``x @ weight + bias``: sigmoid for two classes (sklearn's binary
    form, one column), softmax for more."""

    def __init__(self, decision: AffineMap, classes: np.ndarray) -> None:
        self.decision, self.classes_ = decision, np.asarray(classes)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self.decision.predict(x)
        if z.shape[1] == 1:
            p = 1.0 / (1.0 + np.exp(-z[:, 0]))
            return np.stack([1.0 - p, p], axis=1)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(x).argmax(1)]


def _classes(head: Any) -> list[str] | None:
    classes = getattr(head, "classes_", None)
    return None if classes is None else [str(c) for c in classes]


def _arrays(head: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(arrays, settings) that rebuild ``head``."""
    if isinstance(head, ExpressionProbe):
        pipe = head.probe.pipe if hasattr(head.probe, "pipe") else None
        amap = head.probe if isinstance(head.probe, AffineMap) else AffineMap.of(pipe.predict, pipe.n_features_in_)
        return {"weight": amap.weight, "bias": amap.bias}, {}
    if isinstance(head, LogisticProbe):
        model = head.model
        if not isinstance(model, AffineLogistic):
            model = AffineLogistic(AffineMap.of(model.decision_function, model.n_features_in_), model.classes_)
        return {"weight": model.decision.weight, "bias": model.decision.bias}, {}
    if isinstance(head, PrototypeClassifier):
        return {"prototypes": np.asarray(head.prototypes_, np.float64)}, {"temperature": head.temperature}
    if isinstance(head, ExpressionHead):
        if head.net is None:
            raise ValueError("save_head: the expression head is not fitted")
        arrays = {f"net.{k}": v.detach().cpu().numpy() for k, v in head.net.state_dict().items()}
        return arrays, {"hidden": head.hidden, "dropout": head.dropout,
                        "in_dim": int(head.net[0].normalized_shape[0]), "history": head.history}
    raise TypeError(f"save_head: cannot save a {type(head).__name__}")


def save_head(head: Any, path: str | Path, *, embedding: dict | None = None) -> Path:
    """Write a fitted head: ``path/head.safetensors`` (arrays) and ``path/head.json`` (kind, genes, classes,
    settings, what embedding it expects, the arrays' sha256)."""
    from safetensors.numpy import save_file

    from stofm.util.safe_files import write_described_tensors

    arrays, settings = _arrays(head)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    info = {"format": HEAD_FORMAT, "version": HEAD_VERSION, "kind": head.kind, "genes": getattr(head, "genes", None),
            "classes": _classes(head), "settings": settings, "embedding": embedding or {}}
    write_described_tensors(path / "head.json", path / "head.safetensors", lambda f: save_file(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(f)), info, indent=1)
    return path


def load_head(path: str | Path) -> Any:
    """Read a head written by :func:`save_head`; damaged or foreign files are refused with one error."""
    from stofm.util.safe_files import read_described_tensors

    path = Path(path)
    if (path / "head.pkl").is_file() and not (path / "head.safetensors").is_file():
        raise InputError(f"{path}: a pickled head (head.pkl) from an older stalign; pickles can run code and are no "
                         "longer loaded: fit the head again with `stalign fewshot`")
    info, arrays = read_described_tensors(path, "head.json", "head.safetensors", fmt=HEAD_FORMAT, what="few-shot head",
                                          framework="np")
    try:
        head = _rebuild(info, arrays)
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise DamagedFileError(f"{path}: the few-shot head is inconsistent ({type(err).__name__}: {err})") from None
    head.embedding_info = info.get("embedding", {})
    return head


def _rebuild(info: dict[str, Any], arrays: dict[str, np.ndarray]) -> Any:
    kind, settings = info["kind"], info.get("settings") or {}
    if kind == "ridge":
        head = ExpressionProbe(genes=info["genes"])
        head.probe = AffineMap(arrays["weight"], arrays["bias"])
        _check_width(head.probe.weight.shape[1], len(head.genes), "genes")
    elif kind == "logistic":
        head = LogisticProbe.__new__(LogisticProbe)
        head.model = AffineLogistic(AffineMap(arrays["weight"], arrays["bias"]), np.asarray(info["classes"]))
        _check_width(head.model.decision.weight.shape[1], max(1, len(info["classes"]) - (len(info["classes"]) == 2)),
                     "classes")
    elif kind == "prototype":
        head = PrototypeClassifier(temperature=float(settings["temperature"]))
        head.prototypes_, head.classes_ = arrays["prototypes"], np.asarray(info["classes"])
        _check_width(len(head.prototypes_), len(head.classes_), "classes")
    elif kind == "head":
        import torch

        head = ExpressionHead(genes=info["genes"], hidden=int(settings["hidden"]), dropout=float(settings["dropout"]))
        head.history = list(settings.get("history", []))
        state = {k[len("net."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("net.")}
        head.build(int(settings["in_dim"])).load_state_dict(state)
        head.net.eval()
    else:
        raise InputError(f"unknown head kind {kind!r}")
    return head


def _check_width(got: int, expected: int, what: str) -> None:
    if got != expected:
        raise InputError(f"the arrays have {got} columns for {expected} {what}")

