"""The ``stalign train`` loop on accelerate: mixed precision, accumulation, clipping, checkpoints, resume,
validation retrieval metrics, CSV/TensorBoard logs."""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from stalign.training.config import TrainConfig, resolve_config, write_config
from stalign.training.metrics import format_retrieval, retrieval_metrics
from stofm.util import checkpointing as ckpt
from stofm.util.accelerate_state import fresh_accelerate_state
from stofm.util.errors import NonFiniteLossError


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoint: Path | None  # final weights (save_checkpoint folder); None when the run stopped early
    output_dir: Path
    metrics: dict[str, float]  # last validation metrics (empty without a validation split)
    step: int  # optimizer steps done
    losses: list[tuple[int, float]]  # (step, mean training loss of that step) for the steps run here
    seconds: float


def train_from_config(source: str | Path | dict, *, resume: str | None = None, **overrides: Any) -> TrainResult:
    """Train from a YAML path (or mapping) with config keys overridden by keyword, e.g.
    ``train_from_config("configs/demo.yaml", max_steps=10)``."""
    values = {} if source is None else source
    cfg = resolve_config(values, flags=overrides)
    return train(cfg, resume=resume)


def _model_parts(cfg: TrainConfig, genes: list[str]):
    """The model (new, or from ``cfg.init`` after the gene panel check)."""
    import torch

    import stalign

    if cfg.init:
        model = stalign.load_checkpoint(cfg.init)
        try:
            model.check_genes(genes, source=f"the shards under {cfg.data}")
        except ValueError as err:
            raise type(err)(f"--init {cfg.init}: {err}; prepare the shards with the checkpoint's genes "
                            f"(stalign prep --genes) or train a new model") from None
    else:
        overrides = dict(cfg.model_overrides)
        if cfg.loss_kind == "siglip":
            overrides.setdefault("siglip", True)
        if cfg.loss_kind == "paper":  # the paper's temperature is fixed: no trainable logit scale
            overrides.setdefault("learn_temperature", False)
        model = stalign.create_model(cfg.model, genes=genes, pretrained=cfg.pretrained, **overrides)
    if cfg.loss_kind == "siglip" and not getattr(model.config, "siglip", False):
        raise ValueError(f"loss_kind=siglip needs a model with a logit bias; {cfg.init} was trained without one")
    if cfg.loss_kind == "paper" and isinstance(model.logit_scale, torch.nn.Parameter):
        model.logit_scale.requires_grad_(False)  # a checkpoint with a learned temperature: keep it out of training
    return model


def _transforms(model: Any, *, train: bool) -> tuple[Any, Any]:
    """(spot, niche) crop transforms of the model's two image encoders."""
    name = "train_transform" if train else "eval_transform"
    return getattr(model.spot_image_encoder, name)(), getattr(model.niche_image_encoder, name)()


def _loaders(cfg: TrainConfig, data: Any, accelerator: Any):
    import torch

    from stalign.data.dataset import collate

    per_step = cfg.batch_size * accelerator.num_processes
    if data.n_train < per_step:
        from stalign.training.data import EmptyDataError

        raise EmptyDataError(f"{data.n_train} training spots under {data.root} cannot fill one batch of "
                             f"{cfg.batch_size} x {accelerator.num_processes} process(es); lower batch_size")
    # Own generators: starting an epoch (or a resumed, batch-skipping loader) must not draw from the global RNG
    # that dropout uses, or a resumed run would diverge from an uninterrupted one.
    train_dl = torch.utils.data.DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                           collate_fn=data.collate or collate, num_workers=cfg.num_workers,
                                           generator=torch.Generator().manual_seed(cfg.seed))
    val_dl = None
    if data.val is not None:
        val_dl = torch.utils.data.DataLoader(data.val, batch_size=cfg.batch_size, shuffle=False,
                                             collate_fn=collate, num_workers=cfg.num_workers,
                                             generator=torch.Generator().manual_seed(cfg.seed))
    return train_dl, val_dl, len(data.train) // per_step


@dataclasses.dataclass
class _Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def _evaluate(model: Any, val_dl: Any, accelerator: Any, virtual_cells: Any) -> dict[str, float]:
    """Retrieval recall image->gene / gene->image over all held-out spots (gathered across processes)."""
    import torch

    inner = accelerator.unwrap_model(model)
    was_training = inner.training
    inner.eval()
    images, genes = [], []
    with torch.no_grad(), accelerator.autocast():
        for batch in val_dl:
            if virtual_cells is not None:
                batch = virtual_cells.attach(batch)
            img = inner.encode_image(batch["spot_image"], batch["niche_image"]).float()
            gene = inner.encode_gene(batch).float()
            img, gene = accelerator.gather_for_metrics((img, gene))
            images.append(img.cpu())
            genes.append(gene.cpu())
    inner.train(was_training)
    return retrieval_metrics(torch.cat(images), torch.cat(genes))


def _check_finite(value: Any, accelerator: Any, *, what: str, pos: _Position, last_good: Path | None) -> None:
    """Stop every process together when any of them sees a non-finite ``value``."""
    import torch

    bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=accelerator.device)
    if float(accelerator.reduce(bad, reduction="sum")) > 0:
        where = f"step {pos.step + 1} (epoch {pos.epoch}, batch {pos.batch_in_epoch})"
        keep = (f"the last good checkpoint is {last_good} (resume with --resume {last_good}, e.g. with a lower lr)"
                if last_good else "no checkpoint was saved before it")
        raise NonFiniteLossError(f"non-finite {what} ({float(value.float().sum())}) at {where}; "
                                 f"training stopped, {keep}")


def train(cfg: TrainConfig, *, resume: str | None = None) -> TrainResult:
    """Run (or resume: ``"latest"`` or a checkpoint folder) the training described by ``cfg``."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class _Run:
    """Everything one training run holds between its steps (built by :func:`_set_up`)."""

    cfg: TrainConfig
    accelerator: Any
    model: Any
    data: Any
    loss_fn: Any
    optimizer: Any
    scheduler: Any
    train_dl: Any
    val_dl: Any
    logger: Any
    max_steps: int
    stop_at: int
    pos: _Position = dataclasses.field(default_factory=_Position)
    last_good: Path | None = None  # newest checkpoint written or resumed from
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last validation metrics
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def _train(cfg: TrainConfig, resume: str | None) -> TrainResult:
    """Set up, then epochs of optimizer steps (log, validate, checkpoint after each), then the final weights."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    run = _set_up(cfg, resume)
    bar = tqdm(total=run.max_steps, initial=run.pos.step, disable=not (run.main and cfg.progress), desc="train")
    parts: dict[str, list[float]] = {}  # loss terms of the micro-batches of the current optimizer step
    run.model.train()
    while run.pos.step < run.stop_at:
        for batch in _epoch_batches(run):
            terms, grad_norm = _train_step(run, batch)
            for key, value in terms.items():
                parts.setdefault(key, []).append(float(run.accelerator.reduce(value.detach().float(), "mean")))
            if not run.accelerator.sync_gradients:
                continue  # gradient accumulation: not an optimizer step yet
            run.scheduler.step()
            run.pos.step += 1
            row = {k: sum(v) / len(v) for k, v in parts.items()}
            parts = {}
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            _after_step(run, row, grad_norm)
            if run.pos.step >= run.stop_at:
                break
        if run.pos.batch_in_epoch >= len(run.train_dl):
            run.pos.epoch, run.pos.batch_in_epoch = run.pos.epoch + 1, 0
    bar.close()
    final = _finish(run)
    return TrainResult(checkpoint=final, output_dir=run.out, metrics=run.metrics, step=run.pos.step,
                       losses=run.losses, seconds=time.perf_counter() - started)


def _set_up(cfg: TrainConfig, resume: str | None) -> _Run:
    """Accelerator, model, data and loaders, loss, optimizer and schedule, the resumed position, the run logger."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    from stalign.training.data import build_train_data, shard_genes
    from stalign.training.losses import PairedNegativeLoss, ThreeTargetLoss
    from stofm.util.optim import build_optimizer, build_scheduler
    from stofm.util.runlog import RunLogger

    out = Path(cfg.output_dir)
    fresh_accelerate_state()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.cpu,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    model = _model_parts(cfg, shard_genes(cfg.data))
    data = build_train_data(root=cfg.data, slides=cfg.slides, val_fraction=cfg.val_fraction, split_by=cfg.split_by,
                            seed=cfg.seed, niche_spots=cfg.niche_spots,
                            train_transforms=_transforms(model, train=cfg.augment),
                            eval_transforms=_transforms(model, train=False),
                            val_max_spots=cfg.val_max_spots, n_virtual=cfg.virtual_cells,
                            hard_negative_clusters=cfg.hard_negative_clusters,
                            paired_negatives=cfg.loss_kind == "paper")
    train_dl, val_dl, batches_per_epoch = _loaders(cfg, data, accelerator)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    max_steps = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps
    if cfg.loss_kind == "paper":
        loss_fn = PairedNegativeLoss(alpha=cfg.alpha, beta=cfg.beta, check_finite=False)
    else:
        loss_fn = ThreeTargetLoss(alpha=cfg.alpha, beta=cfg.beta, kind=cfg.loss_kind, check_finite=False)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=max_steps,
                                min_lr_ratio=cfg.min_lr_ratio)
    prepared = accelerator.prepare(model, optimizer, train_dl, scheduler, *([val_dl] if val_dl else []))
    model, optimizer, train_dl, scheduler = prepared[:4]
    val_dl = prepared[4] if val_dl else None

    pos, last_good = _Position(), None
    if resume:
        last_good = ckpt.resolve_resume(out, resume)
        accelerator.load_state(str(last_good))
        saved = ckpt.read_state(last_good)
        pos = _Position(**{k: saved[k] for k in ("step", "epoch", "batch_in_epoch")})
        if pos.batch_in_epoch >= len(train_dl):
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
        accelerator.print(f"resumed from {last_good} at step {pos.step}")
    main = accelerator.is_main_process
    logger = RunLogger(out, enabled=main, tensorboard=cfg.tensorboard, resume_step=pos.step if resume else None)
    if main:
        write_config(cfg, out / "config.yaml")
        left = f", {data.n_left_out} left out (split margin / val_max_spots)" if data.n_left_out else ""
        accelerator.print(f"training {data.n_train} spots ({data.n_val} held out{left}) of {len(data.genes)} genes, "
                          f"{max_steps} steps, global batch {cfg.batch_size * accelerator.num_processes * cfg.grad_accum}"
                          f" on {accelerator.num_processes} process(es) [{accelerator.distributed_type}]")
    return _Run(cfg=cfg, accelerator=accelerator, model=model, data=data, loss_fn=loss_fn, optimizer=optimizer,
                scheduler=scheduler, train_dl=train_dl, val_dl=val_dl, logger=logger, max_steps=max_steps,
                stop_at=min(max_steps, cfg.stop_after_steps or max_steps), pos=pos, last_good=last_good)


def _epoch_batches(run: _Run):
    """The batches of the current epoch (skipping those a resumed run already did), each with what the loss needs
    besides the model's inputs: virtual cells (for the paired negatives too)."""
    from stalign.training.data import EmptyDataError

    run.train_dl.set_epoch(run.pos.epoch)
    if hasattr(run.data.train, "epoch"):
        run.data.train.epoch = run.pos.epoch
    skip = run.pos.batch_in_epoch
    for batch in run.accelerator.skip_first_batches(run.train_dl, skip) if skip else run.train_dl:
        if batch["spot_image"].shape[0] == 0:
            raise EmptyDataError(f"empty training batch at step {run.pos.step + 1} (data under {run.cfg.data})")
        if run.data.virtual_cells is not None:
            batch = run.data.virtual_cells.attach(batch)
            if "negatives" in batch:
                batch["negatives"] = run.data.virtual_cells.attach(batch["negatives"])
        yield batch


def _train_step(run: _Run, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """One micro-batch: forward, loss, backward, clipping and (when gradients sync) the optimizer step.
    Returns the loss terms and the gradient norm (None when not clipped at this micro-batch)."""
    acc, cfg, data = run.accelerator, run.cfg, run.data
    negatives = {}
    if data.clusters is not None and cfg.loss_kind != "paper":  # the paper loss gets its negatives in the batch
        data.clusters = data.clusters.to(batch["index"].device)
        negatives = {"cluster": data.clusters[batch["index"]], "slide_idx": batch["slide_idx"]}
    with acc.accumulate(run.model):
        terms = run.loss_fn(run.model(batch), **negatives)
        _check_finite(terms["loss"].detach(), acc, what="loss", pos=run.pos, last_good=run.last_good)
        acc.backward(terms["loss"])
        grad_norm = None
        if acc.sync_gradients and cfg.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
            if cfg.mixed_precision != "fp16":  # fp16 overflow is the grad scaler's to skip
                _check_finite(grad_norm.detach(), acc, what="gradient norm", pos=run.pos, last_good=run.last_good)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.pos.batch_in_epoch += 1
    return terms, grad_norm


def _after_step(run: _Run, row: dict[str, float], grad_norm: Any) -> None:
    """After an optimizer step: record and log the loss, validate and checkpoint when due."""
    cfg, step = run.cfg, run.pos.step
    run.losses.append((step, row["loss"]))
    if step % cfg.log_every == 0 or step == run.stop_at:
        row |= {"lr": run.scheduler.get_last_lr()[0], "epoch": run.pos.epoch}
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        run.logger.log("train", step, row)
    if cfg.eval_every and step % cfg.eval_every == 0 and step < run.max_steps:
        _validate(run)
    if (cfg.save_every and step % cfg.save_every == 0) or step == run.stop_at < run.max_steps:
        run.last_good = _save_checkpoint(run)


def _validate(run: _Run) -> None:
    """Held-out retrieval metrics at the current step (nothing without a validation split)."""
    if run.val_dl is None:
        return
    run.metrics = _evaluate(run.model, run.val_dl, run.accelerator, run.data.virtual_cells)
    run.logger.log("val", run.pos.step, run.metrics)
    run.accelerator.print(f"step {run.pos.step} held-out retrieval: {format_retrieval(run.metrics)}")


def _save_checkpoint(run: _Run) -> Path:
    """A resumable checkpoint of the current step (accelerate state, then the config and ``trainer_state.json``
    last); older ones pruned to ``keep_checkpoints``."""
    path = ckpt.checkpoint_dir(run.out, run.pos.step)
    quiet = logging.getLogger("accelerate.utils.other")  # "Removed shared tensor": tied modules reload fine
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        run.accelerator.save_state(str(path))
    finally:
        quiet.setLevel(level)
    if run.main:
        write_config(run.cfg, path / "train_config.yaml")
        ckpt.write_state(path, dataclasses.asdict(run.pos) | {"max_steps": run.max_steps})
        ckpt.prune_checkpoints(run.out, keep=run.cfg.keep_checkpoints)
    run.accelerator.wait_for_everyone()
    return path


def _finish(run: _Run) -> Path | None:
    """After the last step: validate and write the final weights (None when the run stopped early)."""
    from stalign.models.factory import save_checkpoint

    final = None
    if run.pos.step >= run.max_steps:
        _validate(run)
        final = run.out / "final"
        if run.main:
            save_checkpoint(run.accelerator.unwrap_model(run.model), final,
                            training={"data": str(run.cfg.data), "steps": run.pos.step, "spots": run.data.n_train,
                                      "metrics": run.metrics})
            write_config(run.cfg, final / "train_config.yaml")
        run.accelerator.wait_for_everyone()
        run.accelerator.print(f"final weights: {final}")
    run.logger.close()
    run.accelerator.end_training()
    return final
