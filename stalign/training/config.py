"""Run configuration of ``stalign train``: YAML file -> defaults, CLI flags and ``key=value`` overrides on top.

Precedence (lowest first): the dataclass defaults, the YAML file, ``--flag value`` options, ``key=value``
positional overrides. The resolved config is written as YAML beside every checkpoint (by the training engine,
``stofm.util.train_engine.Engine.write_config``; :func:`resolve_config` reads it back).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from stofm.util.config_io import ConfigError, load_yaml


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run (see docs/training.md for each one)."""

    # data
    data: str = ""  # shard root: a ``stalign prep`` output folder (manifest.json + shards/)
    slides: list[str] | None = None  # restrict to these slide ids
    val_fraction: float = 0.1  # share of spots held out for validation (0: none)
    split_by: str = "spot"  # "spot", "slide" or "block" (held-out squares with a niche-wide margin: no crop overlap)
    niche_spots: int = 16  # neighbouring spots (self first) given to the niche gene encoder
    virtual_cells: int = 8  # per-slide virtual cells for the niche gene encoder (0: none; an original-SToFM gene side: Leiden's own count)
    augment: bool = True  # flips, rot90, colour jitter (and stain_jitter) on the training crops, batched on the device
    stain_jitter: float = 0.0  # HED stain jitter sigma (Tellez et al. 2018; e.g. 0.05): alpha ~ U(1-s, 1+s), beta ~ U(-s, s) per stain; 0: off
    num_workers: int = 0  # DataLoader worker processes
    feature_views: int = 0  # >0: frozen image encoders; train on their stored trunk features of this many augmented views per crop (feature store), not on pixels
    # model
    model: str = "stalign-tiny"  # model config name (stalign-tiny/-demo/-base) or a config .json
    model_overrides: dict = dataclasses.field(default_factory=dict)  # keys of the model config to change
    pretrained: str | None = None  # backbone weights passed to create_model
    init: str | None = None  # fine-tune from this stalign checkpoint folder
    # loss
    alpha: float = 0.3  # weight of the spot image<->gene term
    beta: float = 0.3  # weight of the niche term (the fused term gets 1 - alpha - beta)
    loss_kind: str = "infonce"  # "infonce", "siglip" or "paper" (ST-Align's published paired-negative InfoNCE)
    hard_negative_clusters: int = 0  # >1: expression k-means clusters per slide; infonce/siglip: same-cluster spots are not negatives; paper: one negative per other cluster (6 in the paper)
    # optimisation
    batch_size: int = 32  # per process; global batch = batch_size x processes x grad_accum
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.05  # AdamW weight decay (not on norms, biases, embeddings)
    weight_decay_end: float | None = None  # set: the weight decay follows a cosine to this at the last step
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.98])  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 100  # linear warm-up steps before the cosine decay
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of lr
    max_steps: int = 1000  # optimizer steps; the cosine schedule spans them
    epochs: int | None = None  # when set, max_steps = epochs x optimizer steps per epoch
    max_grad_norm: float = 1.0  # 0 turns clipping off
    mixed_precision: str = "no"  # "no", "bf16" or "fp16"
    cpu: bool = False  # train on the CPU even with a GPU
    threads: int | None = None  # torch CPU threads per process (None: torch's default)
    seed: int = 0  # seed of the split, initialisation, augmentation and data order
    # bookkeeping
    output_dir: str = "runs/train"  # logs, checkpoints/step_N and final/ go here
    log_every: int = 10  # optimizer steps between rows of train_log.csv
    eval_every: int = 200  # 0: only at the end
    save_every: int = 500  # 0: no intermediate checkpoints
    keep_checkpoints: int = 2  # newest step_N folders kept (0 keeps all)
    val_max_spots: int = 5000  # cap on held-out spots used for the retrieval metrics
    early_stop_patience: int = 0  # >0: stop when the held-out loss has not improved by early_stop_min_delta for this many evaluations (eval_every); the best weights are saved
    early_stop_min_delta: float = 0.001  # the improvement of the held-out loss that counts for early_stop_patience
    stop_after_steps: int | None = None  # end this run early (time-boxed jobs); resume later
    tensorboard: bool = True  # also write TensorBoard scalars (if installed)
    progress: bool = True  # a progress bar

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {"split_by": ("spot", "slide", "block"), "loss_kind": ("infonce", "siglip", "paper"), "mixed_precision": ("no", "bf16", "fp16")}
_HINTS = typing.get_type_hints(TrainConfig)


def _field_help() -> dict[str, str]:
    """The comment beside each field of :class:`TrainConfig` (one source for the docs and ``--help``)."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).replace("``", "")
    return out
FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def _unwrap_optional(hint: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> (X, True); anything else -> (hint, False)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown train config key {key!r}{hint}; known keys: {', '.join(FIELDS)}")


def coerce(key: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the type of the config field ``key``."""
    if key not in _HINTS:
        raise _unknown_key(key)
    hint, optional = _unwrap_optional(_HINTS[key])
    if isinstance(value, str) and hint is not str:
        value = yaml.safe_load(value) if value.strip() else None
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"train config key {key!r} cannot be empty")
    origin = typing.get_origin(hint) or hint
    try:
        if origin is bool:
            if isinstance(value, str) or not isinstance(value, (bool, int)):
                raise TypeError
            return bool(value)
        if origin in (int, float):
            if isinstance(value, bool):
                raise TypeError
            out = origin(float(value)) if origin is float else int(value)
            if origin is int and float(value) != out:
                raise TypeError
            return out
        if origin is str:
            out = str(value)
            if key in _CHOICES and out not in _CHOICES[key]:
                raise ConfigError(f"train config {key}={out!r}: choose one of {', '.join(_CHOICES[key])}")
            return out
        if origin is list:
            (item,) = typing.get_args(hint)
            items = value if isinstance(value, (list, tuple)) else [value]
            return [float(v) if item is float else str(v) for v in items]
        if origin is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"train config {key}={value!r} is not a valid {_HINTS[key]}") from None
    raise ConfigError(f"train config key {key!r} has an unsupported type {hint}")  # pragma: no cover

def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings (``model_overrides.depth=2`` sets one entry of a dict field)."""
    values = dict(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        field, _, sub = key.partition(".")
        if sub:
            if field not in _HINTS or (typing.get_origin(_HINTS[field]) or _HINTS[field]) is not dict:
                raise ConfigError(f"override {item!r}: only dict keys ({field!r} is not one) take a dotted name")
            values[field] = {**dict(values.get(field) or {}), sub: yaml.safe_load(raw)}
        else:
            values[field] = raw
    return values


def build_config(values: dict[str, Any] | None = None) -> TrainConfig:
    """A validated :class:`TrainConfig` from a mapping (unknown keys, bad types and bad values raise)."""
    cfg = TrainConfig(**{k: coerce(k, v) for k, v in (values or {}).items()})  # coerce refuses unknown keys
    checks = [
        (0.0 <= cfg.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
        (cfg.batch_size >= 2, "batch_size must be >= 2 (contrastive loss needs in-batch negatives)"),
        (cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (cfg.max_steps >= 1 or (cfg.epochs or 0) >= 1, "max_steps (or epochs) must be >= 1"),
        (cfg.lr > 0, "lr must be > 0"),
        (cfg.alpha >= 0 and cfg.beta >= 0 and cfg.alpha + cfg.beta <= 1, "alpha, beta >= 0 with alpha + beta <= 1"),
        (len(cfg.betas) == 2, "betas must be two numbers"),
        (cfg.warmup_steps >= 0 and cfg.max_grad_norm >= 0, "warmup_steps and max_grad_norm must be >= 0"),
        (cfg.weight_decay_end is None or cfg.weight_decay_end >= 0, "weight_decay_end must be >= 0"),
        (0.0 <= cfg.stain_jitter < 1.0, "stain_jitter must be in [0, 1)"),
        (cfg.feature_views >= 0 and cfg.early_stop_patience >= 0 and cfg.early_stop_min_delta >= 0,
         "feature_views, early_stop_patience and early_stop_min_delta must be >= 0"),
        (cfg.early_stop_patience == 0 or (cfg.eval_every > 0 and cfg.val_fraction > 0),
         "early_stop_patience needs held-out evaluations: set eval_every > 0 and val_fraction > 0"),
        (cfg.loss_kind != "paper" or cfg.hard_negative_clusters >= 2,
         "loss_kind=paper draws one negative from each other expression cluster of a slide: set "
         "hard_negative_clusters >= 2 (the paper: 6)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"train config: {message}")
    return cfg


def resolve_config(source: str | Path | dict | None = None, *, overrides: list[str] | None = None,
                   flags: dict[str, Any] | None = None) -> TrainConfig:
    """YAML path (or mapping) < flags < ``key=value`` overrides -> :class:`TrainConfig`."""
    values = load_yaml(find_config(source)) if isinstance(source, (str, Path)) else dict(source or {})
    values.update({k: v for k, v in (flags or {}).items() if v is not None})
    return build_config(apply_overrides(values, list(overrides or [])))


#: Run configs shipped with the package (``stalign train --list-configs``; ``--config NAME`` finds them).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def shipped_configs() -> dict[str, str]:
    """Name -> first comment line of every shipped ``stalign train`` config (``stofm_*``: stofm pretraining)."""
    out = {}
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if path.stem.startswith("stofm_"):
            continue
        first = next((line for line in path.read_text().splitlines() if line.startswith("#")), "#")
        out[path.stem] = first.lstrip("# ").strip()
    return out


def find_config(source: str | Path) -> Path:
    """A config path as given, else a shipped config of that name (``demo``, ``demo.yaml``, ``configs/demo.yaml``)."""
    path = Path(source)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (path.stem + ".yaml")
    if path.suffix in ("", ".yaml", ".yml") and shipped.is_file():
        return shipped
    raise FileNotFoundError(f"train config {path} does not exist (shipped configs: {', '.join(shipped_configs())})")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per scalar or list config key; each defaults to "not given" so the YAML value stays."""
    group = parser.add_argument_group("config keys (override the YAML file)")
    helps = _field_help()
    defaults = TrainConfig().to_dict()
    for name in FIELDS:
        text = f"{helps.get(name, name.replace('_', ' '))} (default {defaults[name]!r})".replace("%", "%%")
        hint, _ = _unwrap_optional(_HINTS[name])
        origin = typing.get_origin(hint) or hint
        flag = "--" + name.replace("_", "-")
        if origin is dict:
            continue  # dict keys only through key=value overrides
        if origin is bool:
            group.add_argument(flag, dest=f"cfg_{name}", action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        elif origin is list:
            group.add_argument(flag, dest=f"cfg_{name}", nargs="+", default=None, metavar="V", help=text)
        else:
            group.add_argument(flag, dest=f"cfg_{name}", default=None, metavar=name.upper(),
                               choices=_CHOICES.get(name), help=text)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The config values given as ``--flags`` on the command line."""
    return {name: getattr(args, f"cfg_{name}") for name in FIELDS if getattr(args, f"cfg_{name}", None) is not None}
