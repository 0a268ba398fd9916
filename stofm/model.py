"""The SToFM model: a cell encoder (gene scale) + the SE(2) transformer (micro/macro scale) + pretraining heads.

Configs by name live in ``stofm/model_configs/<name>.json``; ``create_model`` builds one by name or loads a
folder written by ``SToFM.save_pretrained`` (``config.json`` + ``model.safetensors``; no pickle is read).
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stofm.cell_encoder import (
    CellEncoder,
    build_cell_encoder,
    load_cell_encoder,
    read_weights_folder,
    write_weights_folder,
)
from stofm.objectives import PairDistanceHead, mcm_masks, perturb_coords
from stofm.se2 import SE2Transformer
from stofm.util.errors import InputError

CONFIG_DIR = Path(__file__).with_name("model_configs")
MODEL_FORMAT = "stofm-model"
SE2_KEYS = ("dim", "depth", "heads", "n_gaussians", "k_neighbors", "far_distance", "dropout", "attn_impl", "arch",
            "ffn_dim", "activation")
# geometry: "diameter" (slide diameter = 100, rotation invariant) or "bbox" (the original: bounding-box diagonal =
# 100, centred); tiling: "grid" or "original" (its split_graph); cluster_method: "kmeans", "leiden" or "original"
# (its Leiden at resolution 1 on 0.2 xy + 0.8 PCA2, count free)
TOP_KEYS = ("n_virtual", "cells_per_tile", "max_cells", "geometry", "tiling", "cluster_method")


class SToFM(nn.Module):
    """Cell encoder -> cell embeddings; SE2Transformer over [CLS] + virtual cells + cells; MCM and PDR heads."""

    def __init__(self, *, config: dict, cell_encoder: CellEncoder):
        super().__init__()
        self.config = copy.deepcopy(config)
        self.cell_encoder = cell_encoder
        se2 = self.config["se2"]
        dim, heads, out = se2["dim"], se2["heads"], cell_encoder.out_dim
        if self.arch == "original":  # the original SE(2) and its MCM/PDR heads (lm_head, pair_head)
            from stofm.original.se2 import OriginalArchSE2

            self.se2 = OriginalArchSE2(in_dim=out, **se2)
            self.cell_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))
            self.dist_head = nn.Sequential(nn.Linear(heads, heads), nn.ReLU(), nn.Linear(heads, 1))
        else:
            self.se2 = SE2Transformer(in_dim=out, **se2)
            self.cell_head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Linear(dim, out))
            self.dist_head = PairDistanceHead(heads=heads)

    @classmethod
    def from_config(cls, config: dict) -> SToFM:
        """A fresh model of an :meth:`architecture` (``save_pretrained``'s ``config.json``: format, version ignored)."""
        enc = copy.deepcopy(config["cell_encoder"])
        meta = {k: v for k, v in config.items() if k not in ("format", "version", "cell_encoder")}
        return cls(config=meta, cell_encoder=build_cell_encoder(enc["kind"], **enc["config"]))

    def architecture(self) -> dict:
        """What :meth:`from_config` rebuilds this model from: its config and its cell encoder's kind and config."""
        return copy.deepcopy({**self.config, "cell_encoder": {"kind": self.cell_encoder.kind,
                                                              "config": self.cell_encoder.config}})

    @property
    def arch(self) -> str:
        """"project" (``stofm.se2``) or "original" (``stofm.original.se2``, the released SToFM)."""
        return str(self.config["se2"].get("arch", "project"))

    @property
    def genes(self) -> list[str]:
        return list(self.cell_encoder.genes)

    @property
    def dim(self) -> int:
        return int(self.config["se2"]["dim"])

    @torch.no_grad()
    def encode_cells(self, expr: Any, genes: Sequence[str] | None = None, *, input_kind: str = "counts",
                     batch_size: int = 256, progress: bool = False) -> torch.Tensor:
        """Cell embeddings (N, cell_dim) of an (N, G) matrix over ``genes`` (matched by name to the model's)."""
        return self.cell_encoder.encode_cells(expr, genes, input_kind=input_kind, batch_size=batch_size,
                                              progress=progress)

    def forward(self, cell_emb: torch.Tensor, coords: torch.Tensor, pad_mask: torch.Tensor | None = None,
                virtual_emb: torch.Tensor | None = None, virtual_coords: torch.Tensor | None = None,
                virtual_pad_mask: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
                return_pair: bool = True) -> dict:
        """The SE(2) transformer's outputs (see ``SE2Transformer.forward``) for cell embeddings of sub-slices."""
        return self.se2(cell_emb, coords, pad_mask, virtual_emb, virtual_coords, virtual_pad_mask, mask=mask,
                        return_pair=return_pair)

    def pretrain_forward(self, batch: dict, *, generator: torch.Generator | None = None, mask_ratio: float = 0.12,
                         keep_ratio: float = 0.03, pdr_ratio: float = 0.15, sigma_factor: float = 5.0) -> dict:
        """Masks cells (MCM) and perturbs coordinates (PDR), runs the model, adds the heads' predictions.

        ``batch``: cell_emb (B,N,C), coords (B,N,2), pad_mask (B,N), virtual_emb/coords/pad_mask (B,V,·).
        """
        pad = batch["pad_mask"]
        replace, target = mcm_masks(pad, mask_ratio=mask_ratio, keep_ratio=keep_ratio, generator=generator)
        noisy, perturbed = perturb_coords(batch["coords"], pad, ratio=pdr_ratio, sigma_factor=sigma_factor,
                                          generator=generator)
        out = self(batch["cell_emb"], noisy, pad, batch.get("virtual_emb"), batch.get("virtual_coords"),
                   batch.get("virtual_pad_mask"), mask=replace)
        v = out["virtual"].shape[1]
        out["cell_pred"] = self.cell_head(out["cells"])
        dist = self.dist_head(out["pair"][:, 1 + v:, 1 + v:])
        out["dist_pred"] = dist.squeeze(-1) if self.arch == "original" else dist
        out["mcm_target"], out["perturbed"] = target, perturbed
        return out

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``path/config.json`` and ``path/model.safetensors``."""
        return write_weights_folder(path, {"format": MODEL_FORMAT, "version": 1, **self.architecture()}, self)


def list_models() -> list[str]:
    """Names of the registered configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str) -> dict:
    """The JSON config registered as ``name``."""
    f = CONFIG_DIR / f"{name}.json"
    if not f.is_file():
        raise InputError(f"unknown stofm model {name!r}; known: {', '.join(list_models())} (or a saved folder)")
    cfg = json.loads(f.read_text())
    cfg["name"] = name
    return cfg


def create_model(name_or_path: str | os.PathLike, *, genes: Sequence[str] | None = None,
                 cell_encoder: CellEncoder | str | os.PathLike | None = None, device: Any = "cpu",
                 **overrides: Any) -> SToFM:
    """A SToFM by config name (``stofm-tiny``/``-small``/``-base``) or from a ``save_pretrained`` folder.

    For a name, the cell encoder is ``cell_encoder`` (a module or a ``save_cell_encoder`` folder, e.g. after
    masked-gene pretraining) or a fresh one of the config's kind over ``genes``. ``overrides`` set SE(2)
    keys (dim, depth, heads, k_neighbors, ...), ``n_virtual``/``cells_per_tile``/``max_cells``, or
    ``cell_encoder_cfg`` (a dict merged into the cell encoder's config; a different ``kind`` replaces it).
    """
    path = Path(name_or_path)
    if path.is_dir():
        from stofm.original.convert import is_converted

        if is_converted(path):
            return from_converted(path, genes=genes, cell_encoder=cell_encoder, device=device, **overrides)
        return load_model(path, device=device, **overrides)
    cfg = model_config(str(name_or_path))
    enc_cfg = dict(cfg.pop("cell_encoder"))
    enc_over = dict(overrides.pop("cell_encoder_cfg", None) or {})
    if enc_over.get("kind", enc_cfg["kind"]) != enc_cfg["kind"]:  # another kind: its own defaults
        enc_cfg = {}
    enc_cfg.update(enc_over)
    _apply_overrides(cfg, overrides)
    kind = enc_cfg.pop("kind")
    if cell_encoder is None:
        if genes is None:
            raise InputError(f"create_model({name_or_path!r}) needs genes=[...] (the gene panel/vocabulary) "
                             "or a pretrained cell_encoder")
        cell_encoder = build_cell_encoder(kind, genes=list(genes), **enc_cfg)
    elif not isinstance(cell_encoder, nn.Module):
        cell_encoder = load_cell_encoder(cell_encoder)
    return SToFM(config=cfg, cell_encoder=cell_encoder).to(device)


def from_converted(path: str | os.PathLike, *, genes: Sequence[str] | None = None,
                   cell_encoder: CellEncoder | str | os.PathLike | None = None, device: Any = "cpu",
                   **overrides: Any) -> SToFM:
    """A ``stofm-original`` SToFM whose SE(2) (and MCM/PDR heads, when converted with ``--heads``) are the weights of a
    ``stofm convert`` folder. The cell encoder is ``cell_encoder``, else the folder's converted cell BERT (kind
    ``"geneformer"``: Geneformer's vocabulary as its genes), else (or with ``cell_encoder_cfg``) a fresh one whose
    output width is the checkpoint's input width."""
    from stofm.original.convert import load_converted
    from stofm.original.se2 import OriginalSE2ForMaskedLM

    net, cell = load_converted(path, cell_bert=cell_encoder is None and "cell_encoder_cfg" not in overrides)
    c = (net.model if isinstance(net, OriginalSE2ForMaskedLM) else net).config
    if cell is not None:  # the converted cell BERT, Geneformer's genes
        cell_encoder = cell
    shape = {"dim": c.hidden_size, "depth": c.num_hidden_layers, "heads": c.num_attention_heads,
             "ffn_dim": c.ffn_embedding_dim, "n_gaussians": c.gaussian_hidden_dim, "activation": c.activation_fn}
    enc = {**dict(overrides.pop("cell_encoder_cfg", None) or {}), "out_dim": c.input_dim}
    model = create_model("stofm-original", genes=genes, cell_encoder=cell_encoder, device="cpu",
                         cell_encoder_cfg=enc, **shape, **overrides)
    if model.cell_encoder.out_dim != c.input_dim:
        raise InputError(f"{path}: the SE(2) takes {c.input_dim}-d cell embeddings, the cell encoder gives "
                         f"{model.cell_encoder.out_dim}")
    if isinstance(net, OriginalSE2ForMaskedLM):
        model.se2.model.load_state_dict(net.model.state_dict())
        model.cell_head.load_state_dict(net.lm_head.state_dict())
        model.dist_head.load_state_dict(net.pair_head.state_dict())
    else:
        model.se2.model.load_state_dict(net.state_dict())
    model.config["converted_from"] = str(path)
    return model.to(device)


def load_model(path: str | os.PathLike, *, device: Any = "cpu", **overrides: Any) -> SToFM:
    """Rebuild a model written by ``save_pretrained`` (safetensors only). Overrides: ``attn_impl`` and
    the sub-slicing keys (``n_virtual``, ``cells_per_tile``, ``max_cells``)."""
    meta, tensors = read_weights_folder(path, fmt=MODEL_FORMAT, what="stofm model")
    bad = set(overrides) - set(TOP_KEYS) - {"attn_impl"}
    if bad:
        raise InputError(f"cannot override {sorted(bad)} of a trained model")
    _apply_overrides(meta, overrides)
    model = SToFM.from_config(meta)
    model.load_state_dict(tensors)
    return model.to(device)


def _apply_overrides(cfg: dict, overrides: dict) -> None:
    for key, value in overrides.items():
        if key in SE2_KEYS:
            cfg["se2"][key] = value
        elif key in TOP_KEYS:
            cfg[key] = value
        else:
            raise InputError(f"unknown stofm model option {key!r}; use one of {SE2_KEYS + TOP_KEYS} "
                             "or cell_encoder_cfg={...}")
