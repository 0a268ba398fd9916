"""Models by name: ``stalign/model_configs/<name>.json`` -> ``STAlignConfig`` -> ``STAlign``; checkpoints.

A checkpoint is a folder with ``config.json`` (format, name, overrides, genes, resolved config) and
``model.safetensors`` (no pickle is read). ``create_model`` also accepts a checkpoint folder or a JSON
config path as ``name``.
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stofm.util.config_io import ConfigError, deep_merge
from stofm.util.errors import InputError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "model_configs"
CHECKPOINT_FORMAT = "stalign-model"


def list_models() -> list[str]:
    """Names of the registered model configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def model_config(name: str | os.PathLike) -> dict[str, Any]:
    """The raw config dict of a registered name or a JSON file."""
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    f = CONFIG_DIR / f"{name}.json"
    if not f.is_file():
        raise InputError(f"unknown stalign model {str(name)!r}; known: {', '.join(list_models())} "
                         "(or a checkpoint folder / config .json)")
    return json.loads(f.read_text())


def resolve_config(name: str | os.PathLike, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Config dict of ``name`` with ``overrides`` merged; ``image={...}`` applies to both image encoders."""
    cfg = model_config(name)
    overrides = dict(overrides)
    for key in ("image", "spot_image", "niche_image", "gene"):
        if key in overrides and not isinstance(overrides[key], Mapping):
            raise ConfigError(f"model {name} overrides: {key}={overrides[key]!r} is not a mapping")
    both = overrides.pop("image", None)
    if both:
        overrides = deep_merge({"spot_image": both, "niche_image": both}, overrides)
    for key in ("spot_image", "niche_image"):  # a new backbone spec drops the old backbone's kwargs / weights
        new_spec = (overrides.get(key) or {}).get("spec")
        if new_spec is not None and new_spec != cfg.get(key, {}).get("spec"):
            cfg[key] = {k: v for k, v in cfg.get(key, {}).items() if k not in ("kwargs", "pretrained", "arch")}
    gene_new, gene_old = overrides.get("gene") or {}, cfg.get("gene", {})
    for kind_key, kwargs_key in (("encoder", "encoder_kwargs"), ("niche", "niche_kwargs")):
        if kind_key in gene_new and gene_new[kind_key] != gene_old.get(kind_key):  # options of the old kind
            cfg.setdefault("gene", {}).pop(kwargs_key, None)
    return deep_merge(cfg, overrides)


def _genes(genes: Sequence[str] | None, n_genes: int | None) -> list[str]:
    if genes is not None:
        genes = [str(g) for g in genes]
        if n_genes is not None and n_genes != len(genes):
            raise InputError(f"n_genes={n_genes} but {len(genes)} genes were given")
        if len(set(genes)) != len(genes):
            raise InputError("the gene panel has duplicate names")
        return genes
    if n_genes is None or n_genes < 1:
        raise InputError("create_model needs genes=[...] (the shards' panel) or n_genes >= 1")
    return [f"gene{i}" for i in range(n_genes)]


def create_model(name: str | os.PathLike, *, genes: Sequence[str] | None = None, n_genes: int | None = None,
                 pretrained: str | os.PathLike | bool | None = None, **overrides: Any):
    """An ``STAlign`` by config name (``list_models()``), JSON path or checkpoint folder.

    ``overrides`` are merged into the config (nested dicts merge), e.g. ``embed_dim=256`` or
    ``spot_image={"spec": "uni", "pretrained": "/path/uni.bin"}``; ``image={...}`` sets both image encoders.
    ``pretrained``: a stalign checkpoint folder (or its ``model.safetensors``): all weights are loaded; any other
    path (or ``True``): backbone weights for both image encoders (as ``image={"pretrained": ...}``).
    """
    from stalign.models.stalign_model import STAlign, STAlignConfig

    path = Path(name)
    if path.is_dir():
        model = load_checkpoint(path)
        if genes is not None:
            model.check_genes(genes, source="genes=")
        return model
    full_weights = pretrained is not None and is_stalign_weights(pretrained)
    if pretrained is not None and not full_weights:  # backbone weights for both image encoders
        overrides = deep_merge(overrides, {"image": {"pretrained": pretrained if pretrained is True
                                                     else str(pretrained)}})
    cfg = resolve_config(name, overrides)
    where = f"model {name}" + (f" with overrides {sorted(overrides)}" if overrides else "")
    model = STAlign(config=STAlignConfig.from_dict(cfg, where=where), genes=_genes(genes, n_genes))
    model.meta = {"name": str(name), "overrides": _jsonable(overrides)}
    if full_weights:
        load_weights(model, pretrained)
    return model


def is_stalign_weights(path: str | os.PathLike | bool) -> bool:
    """True for a stalign checkpoint folder or a safetensors file of a whole ``STAlign`` (has ``logit_scale``)."""
    if isinstance(path, bool):
        return False
    path = Path(path)
    if path.is_dir():
        return (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import SafetensorError, safe_open

        from stofm.util.safe_files import DamagedFileError

        try:
            with safe_open(str(path), framework="pt") as fh:
                return "logit_scale" in fh.keys()  # noqa: SIM118 (safe_open is not a dict)
        except (SafetensorError, OSError) as err:
            raise DamagedFileError(f"{path}: weights are damaged or not a safetensors file ({err})") from None
    return False


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
    except TypeError as err:
        raise InputError(f"model overrides must be JSON-serialisable to be saved in checkpoints: {err}") from err
    return copy.deepcopy(obj)


def load_weights(model, path: str | os.PathLike, *, sha256: str | None = None) -> None:
    """Load ``model.safetensors`` (a folder or the file) into ``model`` strictly.

    Shared modules (e.g. one image encoder for spot and niche) are stored once under one of their names; a model
    key absent from the file is missing only when no stored key shares its tensor. (safetensors' own strict
    ``load_model`` misreports BatchNorm ``num_batches_tracked`` of shared modules, which BatchNorm fills in itself.)
    A damaged file (truncated, NaN/inf values, ``sha256`` recorded at save time not matching) is refused.
    """
    from stofm.util.safe_files import load_tensors

    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    state = load_tensors(weights, what="model weights", sha256=sha256)
    own = model.state_dict()
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise InputError(f"{weights}: weights do not fit the model ({str(err)[:500]})") from err
    stored = {own[k].data_ptr() for k in state if k in own}
    missing = sorted(k for k in own if k not in state and own[k].data_ptr() not in stored)
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise InputError(f"{weights}: weights do not fit the model (missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}{' ...' if len(missing) > 10 or len(unexpected) > 10 else ''})")


def save_checkpoint(model, path: str | os.PathLike, *, training: dict[str, Any] | None = None) -> Path:
    """Write ``path/model.safetensors`` and then ``path/config.json`` (with the weights' sha256, checked on load,
    and ``model.crop_spec``, the crops it was trained on, read back by ``load_checkpoint``); returns the folder."""
    from safetensors.torch import save_model

    from stalign import __version__
    from stofm.util.safe_files import write_described_tensors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    stofm_arch = getattr(model.spot_gene_encoder, "stofm_config", None)
    if stofm_arch is not None:  # record the SToFM architecture: loading needs no stofm folder or config name
        frozen = {"freeze": True} if config["gene"]["encoder_kwargs"].get("freeze") else {}
        config["gene"]["encoder_kwargs"] = {"stofm_config": stofm_arch, **frozen}
    meta = {"format": CHECKPOINT_FORMAT, "version": 1, "stalign_version": __version__,
            "name": model.meta.get("name"), "overrides": model.meta.get("overrides", {}),
            "genes": list(model.genes), "config": config}
    if getattr(model, "crop_spec", None) is not None:  # the crops it was trained on: predict cuts the same
        meta["crop"] = model.crop_spec.to_dict()
    write_described_tensors(path / "config.json", path / "model.safetensors", lambda f: save_model(model, str(f)),
                            meta, key="weights_sha256", indent=1)
    from stalign.models.hub import model_card

    (path / "README.md").write_text(model_card(model, training=training))  # the Hugging Face model card
    return path


def load_checkpoint(path: str | os.PathLike, *, device: Any = "cpu"):
    """Rebuild a model saved by ``save_checkpoint`` from its folder, or from the hub as ``hf-hub:org/name[@rev]``
    (through the Hugging Face cache; backbone weights come from the checkpoint)."""
    from stalign.data.crop_spec import CropSpec
    from stalign.models.stalign_model import STAlign, STAlignConfig
    from stofm.util.safe_files import read_json

    if str(path).startswith("hf-hub:"):
        from stalign.models.hub import resolve_hub_checkpoint

        path = resolve_hub_checkpoint(str(path))
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: not a stalign checkpoint folder (no config.json)")
    meta = read_json(cfg_file, what="stalign checkpoint config")
    fmt = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if fmt != CHECKPOINT_FORMAT:
        raise InputError(f"{cfg_file}: not a stalign model config (format {fmt!r})")
    cfg = meta["config"]
    for key in ("spot_image", "niche_image"):
        cfg[key]["pretrained"] = None  # the weights follow from model.safetensors
    model = STAlign(config=STAlignConfig.from_dict(cfg, where=str(cfg_file)), genes=meta["genes"])
    model.meta = {"name": meta.get("name"), "overrides": meta.get("overrides", {}),
                  "weights_sha256": meta.get("weights_sha256")}
    model.crop_spec = CropSpec.from_dict(meta.get("crop"))
    load_weights(model, path, sha256=meta.get("weights_sha256"))
    return model.to(device)
