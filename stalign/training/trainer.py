"""``stalign train``: its objective on the shared training engine (``stofm.util.train_engine``: accelerate, mixed
precision, accumulation, clipping, checkpoints, resume, CSV/TensorBoard logs) with validation retrieval metrics."""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stalign.training.config import TrainConfig, resolve_config
from stalign.training.metrics import format_retrieval, retrieval_metrics
from stofm.util.errors import InputError
from stofm.util.train_engine import Engine, Hooks, make_accelerator


@dataclasses.dataclass
class TrainResult:
    """What a finished run produced."""

    checkpoint: Path | None  # final weights (save_checkpoint folder); None when the run stopped early
    output_dir: Path
    metrics: dict[str, float]  # last validation metrics (empty without a validation split)
    step: int  # optimizer steps done
    losses: list[tuple[int, float]]  # (step, mean training loss of that step) for the steps run here
    seconds: float
    val_history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # {"step", "val_loss", recall...}
    stopped_early: bool = False  # early_stop_patience ended the run; the checkpoint holds the best weights
    best_step: int | None = None  # the step of the lowest held-out loss (with early stopping)


def train_from_config(source: str | Path | dict | None, *, resume: str | None = None, **overrides: Any) -> TrainResult:
    """Train from a YAML path (or mapping) with config keys overridden by keyword, e.g.
    ``train_from_config("configs/demo.yaml", max_steps=10)``."""
    return train(resolve_config(source, flags=overrides), resume=resume)


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
        raise InputError(f"loss_kind=siglip needs a model with a logit bias; {cfg.init} was trained without one")
    if cfg.loss_kind == "paper" and isinstance(model.logit_scale, torch.nn.Parameter):
        model.logit_scale.requires_grad_(False)  # a checkpoint with a learned temperature: keep it out of training
    return model


def _transforms(model: Any, *, train: bool, stain: float = 0.0) -> tuple[Any, Any]:
    """(spot, niche) batched crop transforms (``BatchAugment``) at the input size of the model's two image encoders:
    the training augmentation, or (``train=False``) the resize only."""
    from stalign.models.batch_augment import BatchAugment

    return tuple(BatchAugment(enc.input_size, enc.interpolation, train=train, stain=stain if train else 0.0)
                 for enc in (model.spot_image_encoder, model.niche_image_encoder))


def _loaders(cfg: TrainConfig, data: Any, accelerator: Any):
    import torch

    from stalign.data.dataset import collate

    per_step = cfg.batch_size * accelerator.num_processes
    if data.n_train < per_step:
        from stalign.training.data import EmptyDataError

        raise EmptyDataError(f"{data.n_train} training spots under {data.root} cannot fill one batch of "
                             f"{cfg.batch_size} x {accelerator.num_processes} process(es); lower batch_size")
    # uint8 batches in pinned memory for non-blocking copies to a GPU; workers stay up between epochs unless the
    # dataset draws per epoch in them (its ``epoch`` would not reach a persistent worker). Own generators: starting
    # an epoch (or a resumed, batch-skipping loader) must not draw from the global RNG that dropout uses, or a
    # resumed run would diverge from an uninterrupted one.
    def loader(ds: Any, train: bool, collate_fn: Any) -> Any:
        return torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=train, drop_last=train, collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.num_workers,
            pin_memory=accelerator.device.type == "cuda",
            persistent_workers=cfg.num_workers > 0 and not (train and hasattr(ds, "epoch")))

    train_dl = loader(data.train, True, data.collate or collate)
    return train_dl, None if data.val is None else loader(data.val, False, collate), len(data.train) // per_step


def train(cfg: TrainConfig, *, resume: str | None = None) -> TrainResult:
    """Run (or resume: ``"latest"`` or a checkpoint folder) the training described by ``cfg``."""
    import torch

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        started = time.perf_counter()
        engine, objective = _set_up(cfg, resume)
        engine.run(objective.micro_batches(engine), lambda batch: objective.loss(engine, batch), objective)
        final = objective.finish(engine)
        engine.close()
        return TrainResult(checkpoint=final, output_dir=Path(cfg.output_dir), metrics=objective.metrics,
                           step=engine.step, losses=[(r["step"], r["loss"]) for r in engine.history],
                           seconds=time.perf_counter() - started, val_history=objective.val_history,
                           stopped_early=objective.stopped_early, best_step=objective.best_step)
    finally:
        torch.set_num_threads(threads)


def _set_up(cfg: TrainConfig, resume: str | None) -> tuple[Engine, _Contrastive]:
    """Accelerator, model, data and loaders, loss, optimizer and schedule, the engine (resumed position, run log)."""
    from stalign.data.crop_spec import shard_crops
    from stalign.data.shards import read_manifest
    from stalign.training.data import (
        build_train_data,
        original_cell_embedder,
        shard_genes,
        split_summary,
    )
    from stalign.training.losses import PairedNegativeLoss, ThreeTargetLoss
    from stalign.training.stored_features import StoredViews, check_frozen
    from stofm.util.optim import build_optimizer, build_scheduler

    accelerator = make_accelerator(mixed_precision=cfg.mixed_precision, grad_accum=cfg.grad_accum, cpu=cfg.cpu,
                                   seed=cfg.seed, data_seed=cfg.seed)
    model = _model_parts(cfg, shard_genes(cfg.data))
    # trained on the shards' crops: saved with its checkpoints, so predict cuts the same crops; a model already
    # trained on other crops (init) is warned about with both specs named
    model.crop_spec = shard_crops(read_manifest(Path(cfg.data)), cfg.data, model, "the initial model was trained on")
    if cfg.feature_views:
        check_frozen(model)  # before any split, clustering or feature is computed
    data = build_train_data(root=cfg.data, slides=cfg.slides, val_fraction=cfg.val_fraction, split_by=cfg.split_by,
                            seed=cfg.seed, niche_spots=cfg.niche_spots,
                            train_transforms=_transforms(model, train=cfg.augment, stain=cfg.stain_jitter),
                            eval_transforms=_transforms(model, train=False),
                            val_max_spots=cfg.val_max_spots, n_virtual=cfg.virtual_cells,
                            hard_negative_clusters=cfg.hard_negative_clusters,
                            paired_negatives=cfg.loss_kind == "paper",
                            virtual_embed=original_cell_embedder(model) if cfg.virtual_cells else None,
                            images=not cfg.feature_views)
    views = None
    if cfg.feature_views:  # the frozen encoders' features of K augmented views, from the store (computed once)
        views = StoredViews(model, cfg.data, views=cfg.feature_views, augment=data.augment if cfg.augment else None,
                            plain=data.val_augment, seed=cfg.seed, progress=cfg.progress and accelerator.is_main_process,
                            log=accelerator.print)
        data.augment = data.val_augment = None  # the features are augmented already
        accelerator.print(views.summary)
    train_dl, val_dl, batches_per_epoch = _loaders(cfg, data, accelerator)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.grad_accum)
    max_steps = cfg.epochs * steps_per_epoch if cfg.epochs else cfg.max_steps
    if cfg.loss_kind == "paper":
        loss_fn = PairedNegativeLoss(alpha=cfg.alpha, beta=cfg.beta, check_finite=False)
    else:
        loss_fn = ThreeTargetLoss(alpha=cfg.alpha, beta=cfg.beta, kind=cfg.loss_kind, check_finite=False)
    optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    scheduler = build_scheduler(optimizer, warmup_steps=cfg.warmup_steps, total_steps=max_steps,
                                min_lr_ratio=cfg.min_lr_ratio, weight_decay_end=cfg.weight_decay_end)
    # training batches stay on the CPU until ``micro_batches`` draws their augmentation and copies them
    placement = [True, True, data.augment is None, True] + ([True] if val_dl else [])
    prepared = accelerator.prepare(model, optimizer, train_dl, scheduler, *([val_dl] if val_dl else []),
                                   device_placement=placement)
    model, optimizer, train_dl, scheduler = prepared[:4]
    engine = Engine(accelerator, model, optimizer, scheduler, max_steps=max_steps, output_dir=Path(cfg.output_dir),
                    config=cfg.to_dict(), stop_at=cfg.stop_after_steps or None, max_grad_norm=cfg.max_grad_norm,
                    log_every=cfg.log_every, save_every=cfg.save_every, keep_checkpoints=cfg.keep_checkpoints,
                    tensorboard=cfg.tensorboard, progress=cfg.progress, desc="train")
    val_loss_fn = ThreeTargetLoss(alpha=cfg.alpha, beta=cfg.beta, gather=False, check_finite=False,
                                  kind="infonce" if cfg.loss_kind == "paper" else cfg.loss_kind)
    objective = _Contrastive(cfg, data, loss_fn, train_dl, prepared[4] if val_dl else None, views=views,
                             val_loss_fn=val_loss_fn)
    objective.restore(engine.start(resume))
    if engine.main:
        accelerator.print(f"{split_summary(data)} of {len(data.genes)} genes, "
                          f"{max_steps} steps, global batch {cfg.batch_size * accelerator.num_processes * cfg.grad_accum}"
                          f" on {accelerator.num_processes} process(es) [{accelerator.distributed_type}]")
    return engine, objective


@dataclasses.dataclass
class _Contrastive(Hooks):
    """``stalign train``'s objective: the three-target contrastive loss (or the paper's paired negatives) over
    epochs of shard batches with virtual cells and hard negatives; held-out retrieval; the final weights."""

    cfg: TrainConfig
    data: Any
    loss_fn: Any
    train_dl: Any
    val_dl: Any
    views: Any = None  # StoredViews: training from stored image features (feature_views)
    val_loss_fn: Any = None  # the held-out loss (in-batch, no hard negatives)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of the current epoch taken (a checkpoint resumes after them)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last validation metrics
    val_history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_loss: float = float("inf")  # early stopping: the lowest held-out loss so far, its step and weights
    best_step: int | None = None
    best_state: dict[str, Any] | None = None
    bad_evals: int = 0
    stopped_early: bool = False

    def micro_batches(self, engine: Engine) -> Iterator[dict[str, Any]]:
        """Epochs of batches (skipping those a resumed run did) with virtual cells (the paired negatives' too)."""
        from stalign.training.data import EmptyDataError

        while True:
            self.train_dl.set_epoch(self.epoch)
            if hasattr(self.data.train, "epoch"):
                self.data.train.epoch = self.epoch
            skip = self.batch_in_epoch
            for batch in engine.accelerator.skip_first_batches(self.train_dl, skip) if skip else self.train_dl:
                if batch["index"].shape[0] == 0:
                    raise EmptyDataError(f"empty training batch at step {engine.step + 1} (data under {self.cfg.data})")
                if self.data.augment is not None:  # uint8 batch -> device (non-blocking from pinned memory), augment
                    device = engine.accelerator.device
                    batch = self.data.augment.to_device(batch, device, epoch=self.epoch,
                                                        non_blocking=device.type == "cuda")
                if self.views is not None:  # stored features of this epoch's views in place of the crops
                    batch = self.views.attach(batch, epoch=self.epoch, device=engine.accelerator.device)
                if self.data.virtual_cells is not None:
                    batch = self.data.virtual_cells.attach(batch)
                    if "negatives" in batch:
                        batch["negatives"] = self.data.virtual_cells.attach(batch["negatives"])
                self.batch_in_epoch += 1
                yield batch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def loss(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        negatives = {}
        if self.data.clusters is not None and self.cfg.loss_kind != "paper":  # paper: negatives are in the batch
            self.data.clusters = self.data.clusters.to(batch["index"].device)
            negatives = {"cluster": self.data.clusters[batch["index"]], "slide_idx": batch["slide_idx"]}
        return self.loss_fn(engine.model(batch), **negatives)

    def where(self) -> str:
        return f" (epoch {self.epoch}, batch {self.batch_in_epoch - 1})"

    def log_row(self, engine: Engine, row: dict[str, float], grad_norm: Any) -> dict[str, float]:
        row = super().log_row(engine, row, grad_norm) | {"epoch": self.epoch}
        return row if grad_norm is None else row | {"grad_norm": float(grad_norm)}

    def after_step(self, engine: Engine) -> None:
        if self.cfg.eval_every and engine.step % self.cfg.eval_every == 0 and engine.step < engine.max_steps:
            self.validate(engine)
            if self.cfg.early_stop_patience:
                self._plateau(engine)

    def _plateau(self, engine: Engine) -> None:
        """Early stopping: keep the weights of the lowest held-out loss; stop after ``early_stop_patience``
        evaluations without an improvement of ``early_stop_min_delta``."""
        loss = self.metrics["val_loss"]
        if loss < self.best_loss - self.cfg.early_stop_min_delta:
            inner = engine.accelerator.unwrap_model(engine.model)
            self.best_loss, self.best_step, self.bad_evals = loss, engine.step, 0
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in inner.state_dict().items()}
            return
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.early_stop_patience:
            self.stopped_early = True
            engine.stop_at = engine.step
            engine.accelerator.print(f"step {engine.step}: held-out loss {loss:.4f} has not improved on "
                                     f"{self.best_loss:.4f} (step {self.best_step}) for {self.bad_evals} "
                                     f"evaluations: stopping, keeping the weights of step {self.best_step}")

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "best_val_loss": self.best_loss,
                "best_step": self.best_step, "bad_evals": self.bad_evals}

    def restore(self, saved: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch = saved.get("epoch", 0), saved.get("batch_in_epoch", 0)
        self.best_loss, self.best_step = saved.get("best_val_loss", float("inf")), saved.get("best_step")
        self.bad_evals = saved.get("bad_evals", 0)
        if self.batch_in_epoch >= len(self.train_dl):  # saved at the end of an epoch
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def validate(self, engine: Engine) -> None:
        """Retrieval recall image->gene / gene->image over all held-out spots (gathered across processes)."""
        import torch

        if self.val_dl is None:
            return
        acc, inner = engine.accelerator, engine.accelerator.unwrap_model(engine.model)
        inner.eval()
        images, genes, rows = [], [], []
        with torch.no_grad(), acc.autocast():
            for batch in self.val_dl:
                if self.data.val_augment is not None:
                    batch = self.data.val_augment(batch)
                if self.views is not None:
                    batch = self.views.attach(batch, epoch=None, device=acc.device)
                if self.data.virtual_cells is not None:
                    batch = self.data.virtual_cells.attach(batch)
                out = inner(batch)
                n = out["spot_image_features"].shape[0]
                per_spot = {k: v.float() for k, v in out.items() if torch.is_tensor(v) and v.ndim and v.shape[0] == n}
                scalars = {k: v for k, v in out.items() if k not in per_spot}
                rows.append({k: v.cpu() for k, v in acc.gather_for_metrics(per_spot).items()})
                # = encode_image / encode_gene of the batch, from the embeddings the forward pass computed
                img = inner.combine(out["spot_image_features"], out["niche_image_features"]).float()
                gene = inner.combine(out["spot_gene_features"], out["niche_gene_features"]).float()
                img, gene = acc.gather_for_metrics((img, gene))
                images.append(img.cpu())
                genes.append(gene.cpu())
        inner.train()  # validation runs between training steps
        with torch.no_grad():
            loss = self._held_out_loss(rows, scalars, acc.num_processes)
        self.metrics = {"val_loss": loss,
                        **retrieval_metrics(torch.cat(images), torch.cat(genes))}
        self.val_history.append({"step": engine.step, **self.metrics})
        engine.logger.log("val", engine.step, self.metrics)
        acc.print(f"step {engine.step} held-out retrieval: {format_retrieval(self.metrics)}")

    def _held_out_loss(self, rows: list[dict[str, Any]], scalars: dict[str, Any], processes: int) -> float:
        """The in-batch loss over the gathered held-out outputs in chunks of the global batch (so any number of
        processes gives the one-process value), weighted by chunk size; a chunk of one spot has no negative."""
        import torch

        every = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
        scalars = {k: v.cpu() if torch.is_tensor(v) else v for k, v in scalars.items()}
        size, total, count = self.cfg.batch_size * processes, 0.0, 0
        for start in range(0, len(every["spot_image_features"]), size):
            chunk = {k: v[start:start + size] for k, v in every.items()}
            m = len(chunk["spot_image_features"])
            if m > 1:
                total += float(self.val_loss_fn({**scalars, **chunk})["loss"]) * m
                count += m
        return total / count if count else float("nan")

    def finish(self, engine: Engine) -> Path | None:
        """Validate and write the final weights (None when the run stopped early)."""
        from stalign.models.factory import save_checkpoint

        if engine.step < engine.max_steps and not self.stopped_early:
            return None
        inner = engine.accelerator.unwrap_model(engine.model)
        if self.stopped_early and self.best_state is not None:
            inner.load_state_dict(self.best_state)  # the weights of the lowest held-out loss
        self.validate(engine)
        final = engine.output_dir / "final"
        if engine.main:
            stop = {"stopped_early": True, "best_step": self.best_step} if self.stopped_early else {}
            save_checkpoint(inner, final, training={"data": str(self.cfg.data), "steps": engine.step,
                                                    "spots": self.data.n_train, "metrics": self.metrics, **stop})
            engine.write_config(final / "train_config.yaml")
        engine.accelerator.wait_for_everyone()
        engine.accelerator.print(f"final weights: {final}")
        return final
