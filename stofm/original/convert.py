"""Released SToFM checkpoints in, the project's format out: ``load_original`` reads the original's state dict
(``se2transformer.pth`` saved with ``torch.save``, opened with ``weights_only=True``, or safetensors) with its key
names, checks every key and shape, and ``save_converted`` writes ``config.json`` + ``model.safetensors`` (+ the cell
BERT folder) that ``load_converted`` / ``stofm embed --model DIR`` read back."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from stofm.original.se2 import OriginalSE2, OriginalSE2Config, OriginalSE2ForMaskedLM
from stofm.util.errors import InputError
from stofm.util.safe_files import load_state_dict

FORMAT = "stofm-original"


def infer_config(sd: dict[str, torch.Tensor]) -> OriginalSE2Config:
    """The architecture of an original state dict read off its shapes (activation: GELU, as released)."""
    try:
        layers = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
        return OriginalSE2Config(input_dim=sd["embedding_layer.weight"].shape[1],
                                 hidden_size=sd["embedding_layer.weight"].shape[0], num_hidden_layers=len(layers),
                                 num_attention_heads=sd["gaussian.proj.2.weight"].shape[0],
                                 ffn_embedding_dim=sd["encoder.layers.0.fc1.weight"].shape[0],
                                 gaussian_hidden_dim=sd["gaussian.means.weight"].shape[1])
    except KeyError as err:
        raise InputError(f"not an SToFM SE(2) state dict: no {err.args[0]!r} (keys e.g. {sorted(sd)[:5]})") from None


def load_original(path: str | os.PathLike, *, config: str | os.PathLike | dict | None = None,
                  heads: bool = False) -> OriginalSE2 | OriginalSE2ForMaskedLM:
    """The original SE(2) transformer with weights from ``path`` (the ``SToFMModel`` keys, or ``SToFMForMaskedLM``
    keys with ``model.``; a ``module.`` prefix is stripped). ``config``: the original ``config.json`` (default: one
    beside ``path``, else read off the shapes). ``heads=True`` also loads the MCM/PDR heads."""
    path = Path(path)
    sd = {k.removeprefix("module."): v for k, v in load_state_dict(path).items()}
    if any(k.startswith("model.") for k in sd):
        backbone = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        head_sd = {k: v for k, v in sd.items() if not k.startswith("model.")}
    else:
        backbone, head_sd = sd, {}
    if config is None and (path.parent / "config.json").is_file():
        config = path.parent / "config.json"
    source = path
    if isinstance(config, (str, os.PathLike)):
        from stofm.util.safe_files import read_json

        source, config = config, read_json(config, what="SToFM config")
    try:
        cfg = OriginalSE2Config.from_dict(config) if isinstance(config, dict) else infer_config(backbone)
    except ValueError as err:
        raise InputError(f"{source}: {err}") from None
    model: Any = OriginalSE2ForMaskedLM(cfg) if heads else OriginalSE2(cfg)
    target = {**{f"model.{k}": v for k, v in backbone.items()}, **head_sd} if heads else backbone
    _load_strict(model, target, path)
    return model.eval()


def _load_strict(model: torch.nn.Module, sd: dict[str, torch.Tensor], source: Path) -> None:
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                 f"shape mismatches {shapes[:4]}" if shapes else ""]
        raise InputError(f"{source}: not the SToFM architecture of its config ({'; '.join(p for p in parts if p)})")
    model.load_state_dict(sd)


def save_converted(model: OriginalSE2 | OriginalSE2ForMaskedLM, out: str | os.PathLike, *,
                   cell_bert: str | os.PathLike | None = None, cell_proj: str | os.PathLike | None = None) -> Path:
    """Write ``out/config.json`` + ``out/model.safetensors`` (original key names) and, given the cell BERT
    folder, ``out/cell_bert/`` (the BertModel files, ``cell_proj.safetensors`` and the dictionaries as JSON)."""
    from safetensors.torch import save_file

    from stofm.cell_encoder import write_weights_folder
    from stofm.original.cell_bert import _first, read_dictionary

    out = Path(out)
    meta = {"format": FORMAT, "version": 1, "heads": isinstance(model, OriginalSE2ForMaskedLM),
            "se2": (model.model if isinstance(model, OriginalSE2ForMaskedLM) else model).config.to_dict(),
            "cell_bert": None}
    if cell_bert is not None:
        src, dest = Path(cell_bert), out / "cell_bert"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
        proj = Path(cell_proj) if cell_proj else _first(src, ("cell_proj.safetensors", "cell_proj.bin"))
        save_file({k.removeprefix("pooler.proj."): v.contiguous() for k, v in load_state_dict(
            proj, what="cell projection").items()}, str(dest / "cell_proj.safetensors"))
        for stem in ("token_dictionary", "gene_median_dictionary"):
            found = _first(src, (f"{stem}.json", f"{stem}.pkl"), None)
            if found is not None:
                (dest / f"{stem}.json").write_text(json.dumps(read_dictionary(found, what=stem)))
        meta["cell_bert"] = "cell_bert"
    return write_weights_folder(out, meta, model)


def is_converted(path: str | os.PathLike) -> bool:
    """True for a folder written by :func:`save_converted`."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def load_converted(path: str | os.PathLike, *, cell_bert: bool = True
                   ) -> tuple[OriginalSE2 | OriginalSE2ForMaskedLM, Any]:
    """(SE(2) model, cell BERT (a ``GeneformerCellEncoder``) or None) of a folder written by :func:`save_converted`;
    ``cell_bert=False`` leaves the cell BERT unread."""
    from stofm.cell_encoder import read_weights_folder

    path = Path(path)
    meta, sd = read_weights_folder(path, fmt=FORMAT, what="converted SToFM")
    try:
        cfg = OriginalSE2Config.from_dict(meta.get("se2") or {})
    except ValueError as err:
        raise InputError(f"{path / 'config.json'}: {err}") from None
    model: Any = OriginalSE2ForMaskedLM(cfg) if meta.get("heads") else OriginalSE2(cfg)
    _load_strict(model, sd, path / "model.safetensors")
    cell = None
    if cell_bert and meta.get("cell_bert"):
        from stofm.original.cell_bert import load_cell_bert

        cell = load_cell_bert(path / meta["cell_bert"])
    return model.eval(), cell
