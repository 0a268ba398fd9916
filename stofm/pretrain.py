"""SToFM pretraining (MCM + PDR) with accelerate: ``stofm pretrain --config configs/stofm_tiny.yaml``.

``objective: project`` (default) is the project's MCM/PDR (``stofm.objectives``); ``objective: original`` is the
original SToFM's (``stofm.objectives_original``: its collator and its heads; needs a ``stofm-original`` model,
``configs/stofm_original_tiny.yaml``).

Data: AnnData files (``.h5ad`` or ``.zarr``) with ``obsm['spatial']``. Each slide is prepared once: the cell
encoder (frozen, as in SToFM, where cell embeddings are computed before the spatial stage) embeds every cell,
virtual cells are clustered, the slide is tiled into sub-slices. Batches of sub-slices are padded to one length
with the slide's virtual cells prepended. Batch order and the MCM/PDR draws are functions of (seed, step), and
``save_state`` stores the RNGs, so a resumed run continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from stofm.util.errors import InputError
from stofm.util.train_engine import Engine, make_accelerator

DEFAULTS_NOTE = "YAML keys become defaults; command-line flags override them"


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs (the YAML run config maps onto these keys)."""

    data: list[str] = field(default_factory=list)
    output_dir: str = "runs/stofm"
    model: str = "stofm-tiny"
    model_overrides: dict = field(default_factory=dict)
    cell_encoder: str | None = None       # a save_cell_encoder folder (e.g. after masked-gene pretraining)
    init_from: str | None = None          # a save_pretrained folder to continue from
    genes: list[str] | None = None        # gene panel; default: the first data file's genes
    layer: str | None = None
    spatial_key: str = "spatial"
    gene_key: str | None = None
    input_kind: str = "auto"
    n_virtual: int | None = None
    cells_per_tile: int | None = None
    max_cells: int | None = None
    cluster_method: str | None = None     # None: the model config's (kmeans; stofm-original: its Leiden)
    max_steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    max_grad_norm: float = 1.0
    mask_ratio: float = 0.12
    keep_ratio: float = 0.03
    pdr_ratio: float = 0.15
    sigma_factor: float = 5.0
    mcm_weight: float = 1.0
    pdr_weight: float = 1.0
    objective: str = "project"            # or "original" (the original collator + heads; stofm-original models)
    mixed_precision: str = "auto"         # auto = bf16 on a GPU, no on CPU
    cpu: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 3
    progress: bool = True


def _read_adata(path: str, resolve_path: Callable[[str], Path] | None = None):
    """One pretraining slide; ``resolve_path`` maps config entries such as ``fetch:<data set>/<file>`` to files."""
    from stofm.util.safe_files import read_h5ad

    if resolve_path is not None:
        p = Path(resolve_path(str(path)))
    elif str(path).startswith("fetch:"):
        raise InputError(f"pretraining data {path}: fetch: data sets live in stalign's cache; run "
                         "`stalign pretrain-stofm` (it fetches them) or give a local .h5ad/.zarr path")
    else:
        p = Path(path).expanduser()
    if p.suffix not in (".h5ad", ".zarr") and not p.is_dir():
        raise InputError(f"pretraining data {p}: expected an .h5ad file or a .zarr folder")
    return read_h5ad(p, what="pretraining data")


def _step_module(model: Any, cfg: PretrainConfig) -> Any:
    """Model + loss in one module, so the prepared (maybe DDP) module runs a whole MCM+PDR step in ``forward``."""
    from torch import nn

    from stofm.objectives import SToFMPretrainLoss
    from stofm.objectives_original import OriginalPretrainLoss

    class PretrainStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            weights = {"mcm_weight": cfg.mcm_weight, "pdr_weight": cfg.pdr_weight}
            self.loss = OriginalPretrainLoss(**weights) if cfg.objective == "original" else SToFMPretrainLoss(**weights)

        def forward(self, batch: dict, generator: Any) -> dict:
            if cfg.objective == "original":  # batch: the original collator's, masks already drawn
                return self.loss(self.model, batch)
            out = self.model.pretrain_forward(batch, generator=generator, mask_ratio=cfg.mask_ratio,
                                              keep_ratio=cfg.keep_ratio, pdr_ratio=cfg.pdr_ratio,
                                              sigma_factor=cfg.sigma_factor)
            return self.loss(out, batch)

    return PretrainStep()


@lru_cache(maxsize=4)
def _epoch_order(n_items: int, seed: int, epoch: int) -> tuple[int, ...]:
    import numpy as np

    return tuple(int(i) for i in np.random.default_rng([seed, epoch]).permutation(n_items))


def batch_items(n_items: int, *, step: int, micro: int, grad_accum: int, batch_size: int, seed: int,
                rank: int = 0, world: int = 1) -> list[int]:
    """Item indices of one micro-batch: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    m = (step * grad_accum + micro) * world + rank
    return [_epoch_order(n_items, seed, pos // n_items)[pos % n_items]
            for pos in range(m * batch_size, (m + 1) * batch_size)]


def pretrain(cfg: PretrainConfig, *, resume: str | None = None,
             resolve_path: Callable[[str], Path] | None = None) -> dict:
    """Run (or resume: ``"latest"`` or a checkpoint folder) a pretraining run; returns a summary dict.
    ``resolve_path`` turns data entries into files (``stalign pretrain-stofm`` resolves ``fetch:`` with it)."""
    import torch

    from stofm.embedding import adata_expression, prepare_slide
    from stofm.model import create_model
    from stofm.util.optim import build_optimizer, build_scheduler

    if not cfg.data:
        raise InputError("pretraining needs data: a list of .h5ad/.zarr files (config key 'data')")
    started = time.perf_counter()
    out = Path(cfg.output_dir)
    auto = "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"
    mp = auto if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = make_accelerator(mixed_precision=mp, grad_accum=cfg.grad_accum, cpu=cfg.cpu, seed=cfg.seed)
    adatas = [_read_adata(p, resolve_path) for p in cfg.data]
    genes = cfg.genes or adata_expression(adatas[0], layer=cfg.layer, gene_key=cfg.gene_key, where=cfg.data[0])[1]
    if cfg.init_from:
        model = create_model(cfg.init_from)
    else:
        model = create_model(cfg.model, genes=genes, cell_encoder=cfg.cell_encoder, **cfg.model_overrides)
    model = model.to(accelerator.device)
    model.cell_encoder.requires_grad_(False)
    slides = [prepare_slide(a, model, layer=cfg.layer, spatial_key=cfg.spatial_key, gene_key=cfg.gene_key,
                            input_kind=cfg.input_kind, n_virtual=cfg.n_virtual, cells_per_tile=cfg.cells_per_tile,
                            max_cells=cfg.max_cells, seed=cfg.seed, cluster_method=cfg.cluster_method,
                            where=str(p))
              for a, p in zip(adatas, cfg.data)]
    del adatas
    if cfg.objective == "original":
        from stofm.objectives_original import tile_subslices

        if getattr(model, "arch", "project") != "original":
            raise InputError(f"objective 'original' needs a stofm-original model, not {cfg.model!r} (arch project)")
        items: list = [sub for s in slides for sub in tile_subslices(s)]
    else:
        items = [(s, t) for s in slides for t in s.tiles]
    step_module = _step_module(model, cfg)
    optimizer = build_optimizer(step_module, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps)
    engine = Engine(accelerator, *accelerator.prepare(step_module, optimizer, scheduler), max_steps=cfg.max_steps,
                    output_dir=out, config=asdict(cfg), max_grad_norm=cfg.max_grad_norm, log_every=cfg.log_every,
                    save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints, progress=cfg.progress,
                    desc="stofm pretrain")
    engine.start(resume)
    accelerator.print(f"pretraining on {sum(len(s.coords) for s in slides)} cells of {len(slides)} slide(s), "
                      f"{len(items)} sub-slices, {cfg.max_steps} steps [{accelerator.distributed_type}, {mp}]")
    engine.run(_micro_batches(cfg, items, engine), lambda batch: engine.model(*batch))
    final = out / "model"
    if engine.main:
        accelerator.unwrap_model(engine.model).model.save_pretrained(final)
        accelerator.print(f"pretrained model: {final}")
    accelerator.wait_for_everyone()
    engine.close()
    return {"model": final, "output_dir": out, "step": engine.step, "losses": engine.history,
            "seconds": time.perf_counter() - started}


def _micro_batches(cfg: PretrainConfig, items: list, engine: Engine) -> Iterator[tuple[dict, Any]]:
    """(batch, generator) per micro-batch: its sub-slices (:func:`batch_items`) and masking draws are functions of
    (seed, step, micro-batch, rank), so a resumed run continues exactly as an uninterrupted one."""
    import torch

    from stofm.embedding import collate_subslices
    from stofm.objectives_original import masked_batch

    acc = engine.accelerator
    while True:
        for micro in range(cfg.grad_accum):
            idx = batch_items(len(items), step=engine.step, micro=micro, grad_accum=cfg.grad_accum,
                              batch_size=cfg.batch_size, seed=cfg.seed, rank=acc.process_index,
                              world=acc.num_processes)
            draw = cfg.seed * 1_000_003 + (engine.step * cfg.grad_accum + micro) * 1009 + acc.process_index
            if cfg.objective == "original":  # the original collator draws its masks here
                batch = masked_batch([items[i] for i in idx], seed=draw, rate=cfg.mask_ratio, keep=cfg.keep_ratio)
            else:
                batch = collate_subslices([items[i] for i in idx])
            yield batch, torch.Generator().manual_seed(draw)


def load_config(path: str | Path | None, **overrides: Any) -> PretrainConfig:
    """A ``PretrainConfig`` from a YAML file (unknown keys raise) with ``overrides`` on top."""
    from stofm.util.config_io import load_yaml

    values = {} if path is None else load_yaml(path, what="stofm pretrain config")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown stofm pretrain config key(s) {unknown}; known: {sorted(known)}")
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    cfg = PretrainConfig(**values)
    for name, ok in (("batch_size", cfg.batch_size >= 1), ("grad_accum", cfg.grad_accum >= 1),
                     ("max_steps", cfg.max_steps >= 1), ("lr", cfg.lr > 0),
                     ("mixed_precision", cfg.mixed_precision in ("auto", "no", "bf16", "fp16")),
                     ("cluster_method", cfg.cluster_method in (None, "kmeans", "leiden", "original")),
                     ("objective", cfg.objective in ("project", "original"))):
        if not ok:
            raise InputError(f"stofm pretrain config: invalid {name}={getattr(cfg, name)!r}")
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The pretraining flags (shared by ``stofm pretrain`` and ``stalign pretrain-stofm``)."""
    parser.add_argument("--config", help=f"YAML run config ({DEFAULTS_NOTE})")
    parser.add_argument("--data", nargs="+", help="AnnData files (.h5ad / .zarr) with obsm['spatial']")
    parser.add_argument("--output-dir", dest="output_dir")
    parser.add_argument("--model", help="config name (stofm-tiny/-small/-base; stofm-original(-tiny): the original "
                                        "architecture) or a saved/converted folder")
    parser.add_argument("--objective", choices=("project", "original"),
                        help="MCM/PDR of the project or of the original SToFM (its collator and heads; "
                             "stofm-original models)")
    parser.add_argument("--cell-encoder", dest="cell_encoder", help="a pretrained cell encoder folder")
    for name, typ in (("max_steps", int), ("batch_size", int), ("grad_accum", int), ("lr", float),
                      ("save_every", int), ("log_every", int), ("seed", int), ("cells_per_tile", int),
                      ("n_virtual", int)):
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    parser.add_argument("--mixed-precision", dest="mixed_precision", choices=("auto", "no", "bf16", "fp16"))
    parser.add_argument("--cpu", action="store_true", default=None, help="train on the CPU even with a GPU")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the latest checkpoint of --output-dir, or from the given checkpoint folder")


def run_from_args(args: argparse.Namespace, *, resolve_path: Callable[[str], Path] | None = None) -> int:
    """Entry point for the parsed flags of :func:`add_arguments` (``resolve_path``: see :func:`pretrain`)."""
    keys = {f.name for f in fields(PretrainConfig)}  # each flag's dest is its config key
    cfg = load_config(args.config, **{k: v for k, v in vars(args).items() if k in keys})
    res = pretrain(cfg, resume=args.resume, resolve_path=resolve_path)
    last = res["losses"][-1] if res["losses"] else {}
    print(f"done: {res['step']} steps in {res['seconds']:.1f}s; last loss "
          + ", ".join(f"{k}={v:.4f}" for k, v in last.items() if k != "step") + f"; model at {res['model']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stofm.pretrain --config ...``"""
    parser = argparse.ArgumentParser(prog="stofm pretrain", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
