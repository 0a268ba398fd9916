"""The original SToFM cell encoder: Geneformer rank-value tokens -> Hugging Face ``BertModel`` -> the ``<cls>`` state
-> ``Linear`` -> L2 norm, as the project cell-encoder kind ``"geneformer"`` (``GeneformerCellEncoder``), so an
``SToFM`` built from a ``stofm convert`` folder with a cell BERT, ``stofm.embed`` and pretraining use it. Needs
``transformers`` (``pip install 'stalign[geneformer]'``).

Tokens, as Geneformer and SToFM make them: keep the matrix columns whose gene has a median; score = count /
(the cell's total over *all* columns) x 10,000 / median; drop zeros; sort by descending score (numpy's argsort of
the negated scores, as the original); map to token ids; keep the first 2,048; at encode time prepend ``<cls>``
(``len(token dictionary)`` when the dictionary has none, as ``model/utils.py`` appends it) and cut to 2,048.
Tokens depend only on the order of count / median within a cell (the division by the cell's total is a per-cell
scale), so log1p cp10k input gives the same tokens as counts (it is expm1'ed first) up to exact ties; the
encoder's genes are the token dictionary's genes that have a median.
Geneformer's dictionaries are read from JSON or from its ``.pkl`` files through a restricted unpickler that builds
only dicts of str/int/float and numpy scalars, so a crafted pickle cannot run code.
"""
from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stofm.cell_encoder import CellEncoder, check_expr, register_cell_encoder
from stofm.tokenize import check_input_kind
from stofm.util.errors import InputError, MissingDependencyError, StofmError
from stofm.util.safe_files import require_path

MAX_TOKENS = 2048
_ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}


class _Refused(StofmError, pickle.UnpicklingError):
    """A pickle that asks for anything beyond numbers and strings."""


class _DictionaryUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"refusing to load {module}.{name}: a Geneformer dictionary holds only "
                                     "str keys and int/float values")


def read_dictionary(path: str | os.PathLike, *, what: str = "gene dictionary") -> dict[str, Any]:
    """A Geneformer token or median dictionary from ``.json`` or ``.pkl`` (restricted: no code runs); values as
    Python int/float."""
    path = require_path(path, what, missing="not found")
    try:
        if path.suffix == ".pkl":
            with open(path, "rb") as fh:
                raw = _DictionaryUnpickler(fh).load()
        else:
            raw = json.loads(path.read_text())
    except _Refused as err:
        raise InputError(f"{path}: {what}: {err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, UnicodeDecodeError, TypeError, AttributeError) as err:
        raise InputError(f"{path}: {what} is damaged or not a dictionary ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise InputError(f"{path}: {what} must map gene ids (str) to numbers, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise InputError(f"{path}: {what} value of {key!r} is {type(value).__name__}, not a number")
        out[key] = value.item() if isinstance(value, np.generic) else value
    return out


class GeneformerTokenizer:
    """Rank-value tokens of cells x genes count matrices with Geneformer's token and median dictionaries."""

    def __init__(self, token_dict: dict[str, int], medians: dict[str, float]) -> None:
        self.token_dict = dict(token_dict)
        self.medians = dict(medians)
        self.cls_id = int(self.token_dict.get("<cls>", len(self.token_dict)))
        self.pad_id = int(self.token_dict.get("<pad>", 0))

    @classmethod
    def from_files(cls, token_dict: str | os.PathLike, medians: str | os.PathLike) -> GeneformerTokenizer:
        return cls(read_dictionary(token_dict, what="token dictionary"),
                   read_dictionary(medians, what="gene median dictionary"))

    def rank_tokens(self, counts: Any, genes: Sequence[str], *, max_tokens: int = MAX_TOKENS) -> list[np.ndarray]:
        """Per cell, the token ids of its expressed genes by descending normalised score (before ``<cls>``)."""
        import scipy.sparse as sp

        counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
        genes = [str(g) for g in genes]
        if counts.ndim != 2 or counts.shape[1] != len(genes):
            raise ValueError(f"counts must be (cells, {len(genes)} genes), got {counts.shape}")
        cols = np.asarray([i for i, g in enumerate(genes) if g in self.medians and g in self.token_dict], np.int64)
        if len(cols) == 0:
            raise InputError(f"none of the {len(genes)} genes (e.g. {genes[:3]}) is in the Geneformer dictionaries; "
                             "Geneformer expects Ensembl ids (var['gene_ids'])")
        n_counts = counts.sum(1).astype(np.float64)
        medians = np.asarray([self.medians[genes[c]] for c in cols], np.float64)
        ids = np.asarray([self.token_dict[genes[c]] for c in cols], np.int64)
        out = []
        for row, total in zip(counts[:, cols].astype(np.float64), n_counts):
            score = row / (total if total > 0 else 1.0) * 1e4 / medians
            nz = np.nonzero(score)[0]
            out.append(ids[nz][np.argsort(-score[nz])][:max_tokens])
        return out

    def batch(self, tokens: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """``<cls>`` + tokens cut to 2,048, right-padded: ``input_ids`` and ``attention_mask`` (B, L) int64."""
        seqs = [np.concatenate([[self.cls_id], t])[:MAX_TOKENS] for t in tokens]
        n = max(len(s) for s in seqs)
        ids = np.full((len(seqs), n), self.pad_id, np.int64)
        mask = np.zeros((len(seqs), n), np.int64)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError("the SToFM cell BERT needs transformers: pip install 'stalign[geneformer]'") from None
    return transformers


@register_cell_encoder("geneformer")
class GeneformerCellEncoder(CellEncoder):
    """``bert_config``: a ``BertConfig`` dict; ``token_dict`` / ``medians``: Geneformer's dictionaries (JSON-able, so
    ``save_pretrained`` keeps them in ``config.json``); ``out_dim``: the projection's width."""

    def __init__(self, *, bert_config: dict[str, Any], token_dict: dict[str, int], medians: dict[str, float],
                 out_dim: int = 256, genes: list[str] | None = None) -> None:
        super().__init__()
        tf = _transformers()
        self.tokenizer = GeneformerTokenizer(token_dict, medians)
        self.genes = [g for g in token_dict if g in medians]
        if not self.genes:
            raise InputError("the Geneformer token and median dictionaries share no gene")
        cfg = tf.BertConfig(**bert_config)
        self.bert = tf.BertModel(cfg, add_pooling_layer=False)
        self.proj = nn.Linear(cfg.hidden_size, int(out_dim))
        self.out_dim = int(out_dim)
        self.config = {"bert_config": dict(bert_config), "token_dict": dict(token_dict), "medians": dict(medians),
                       "out_dim": self.out_dim}

    def embed_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, out_dim) L2-normalised embeddings of token batches (``tokenizer.batch``)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return F.normalize(self.proj(hidden[:, 0]), dim=-1)

    def forward(self, expr: torch.Tensor, *, input_kind: str = "counts") -> torch.Tensor:
        """(B, out_dim) L2-normalised embeddings of ``expr`` (B, G) over ``self.genes`` (counts or log1p)."""
        check_expr(expr, len(self.genes))
        check_input_kind(input_kind)
        x = torch.expm1(expr.double()) if input_kind == "log1p" else expr.double()
        batch = self.tokenizer.batch([np.asarray(t, np.int64) for t in self.tokenizer.rank_tokens(x.cpu().numpy(),
                                                                                                  self.genes)])
        dev = self.proj.weight.device
        return self.embed_tokens(batch["input_ids"].to(dev), batch["attention_mask"].to(dev))


def load_cell_bert(folder: str | os.PathLike, *, proj: str | os.PathLike | None = None,
                   token_dict: str | os.PathLike | None = None,
                   medians: str | os.PathLike | None = None) -> GeneformerCellEncoder:
    """The cell encoder of a Hugging Face ``BertModel`` folder (Geneformer or SToFM's cell_bert), the projection
    (``cell_proj.bin`` / ``.safetensors``: a ``Linear`` state dict, default: in the folder) and Geneformer's
    dictionaries (default: ``token_dictionary`` / ``gene_median_dictionary``, ``.json`` or ``.pkl``, in the folder)."""
    from stofm.util.safe_files import load_state_dict

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face BertModel folder (no config.json)")
    td = Path(token_dict) if token_dict else _first(folder, ("token_dictionary.json", "token_dictionary.pkl"), None)
    md = Path(medians) if medians else _first(folder, ("gene_median_dictionary.json", "gene_median_dictionary.pkl"),
                                              None)
    if td is None or md is None:
        raise FileNotFoundError(f"{folder}: the cell BERT needs Geneformer's token_dictionary and "
                                "gene_median_dictionary (.json or .pkl) beside it")
    tok = GeneformerTokenizer.from_files(td, md)
    if not (folder / "model.safetensors").is_file() and (folder / "pytorch_model.bin").is_file():
        load_state_dict(folder / "pytorch_model.bin", what="cell BERT weights")  # vetted here: tensors only
    try:
        bert = _quiet_from_pretrained(_transformers().BertModel, folder)
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{folder}: cannot load the BertModel ({' '.join(str(err).split())[:300]})") from None
    if tok.cls_id >= bert.config.vocab_size:
        raise InputError(f"{td}: <cls> id {tok.cls_id} is outside the BERT vocabulary ({bert.config.vocab_size})")
    proj_path = Path(proj) if proj else _first(folder, ("cell_proj.safetensors", "cell_proj.bin", "cell_proj.pth"))
    sd = {k.removeprefix("pooler.proj."): v for k, v in load_state_dict(proj_path, what="cell projection").items()}
    if set(sd) != {"weight", "bias"} or sd["weight"].shape[1] != bert.config.hidden_size:
        raise InputError(f"{proj_path}: expected a Linear({bert.config.hidden_size}, D) state dict (weight, bias), "
                         f"got {[(k, tuple(v.shape)) for k, v in sd.items()]}")
    enc = GeneformerCellEncoder(bert_config=bert.config.to_dict(), token_dict=tok.token_dict, medians=tok.medians,
                                out_dim=sd["weight"].shape[0])
    enc.bert.load_state_dict(bert.state_dict())
    enc.proj.load_state_dict(sd)
    return enc.eval()


def _quiet_from_pretrained(cls: Any, folder: Path) -> nn.Module:
    """``from_pretrained`` without transformers' progress bar and load report (the pooler that SToFM replaces is
    the only unexpected key of a cell_bert folder)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(str(folder), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _first(folder: Path, names: Sequence[str], default: Any = ...) -> Any:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if default is ...:
        raise FileNotFoundError(f"{folder}: none of {list(names)}")
    return default
