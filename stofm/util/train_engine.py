"""The one training engine of ``stalign train``, ``stofm pretrain`` (MCM + PDR) and masked-gene pretraining.

:class:`Engine` runs the optimizer-step loop (gradient accumulation, clipping, a non-finite check across processes,
scheduler step) with the progress bar, run log (``runlog``), checkpoints (``checkpointing``) and resume. A training
gives it micro-batches (an iterator), a function from one micro-batch to its loss terms and, optionally,
:class:`Hooks`. A run: ``make_accelerator``; prepare model, optimizer and scheduler; ``engine = Engine(...)``;
``engine.start(resume)``; ``engine.run(batches, loss, hooks)``; save the result; ``engine.close()``.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stofm.util import checkpointing as ckpt
from stofm.util.errors import NonFiniteLossError, SetupError
from stofm.util.output_paths import take_lock, write_errors
from stofm.util.runlog import RunLogger


def make_accelerator(*, mixed_precision: str, seed: int, grad_accum: int = 1, cpu: bool = False,
                     data_seed: int | None = None) -> Any:
    """An ``Accelerator`` from a fresh state (a single process may train several times with other settings);
    ``seed`` seeds every RNG, ``data_seed`` makes the samplers of prepared loaders seedable."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.state import AcceleratorState, GradientState, PartialState
    from accelerate.utils import set_seed

    if PartialState._shared_state and PartialState().num_processes == 1:  # distributed: the process group lives there
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    loaders = None if data_seed is None else DataLoaderConfiguration(use_seedable_sampler=True, data_seed=data_seed)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=cpu,
                              dataloader_config=loaders, step_scheduler_with_optimizer=False)
    set_seed(seed)
    return accelerator


class Hooks:
    """What a training adds to the engine's steps; each default does nothing more."""

    def where(self) -> str:
        """Where the current micro-batch is, for the non-finite error (e.g. ``" (epoch 1, batch 3)"``)."""
        return ""

    def log_row(self, engine: Engine, row: dict[str, float], grad_norm: Any) -> dict[str, float]:
        """The train-log row of a step from its mean loss terms."""
        return row | {"lr": engine.scheduler.get_last_lr()[0]}

    def after_step(self, engine: Engine) -> None:
        """After a step is logged, before its checkpoint (e.g. validation)."""

    def position(self) -> dict[str, Any]:
        """Keys of ``trainer_state.json`` besides ``step`` and ``max_steps`` (where the data resumes)."""
        return {}


#: The lock a training holds in its ``output_dir`` (``filelock``; released by the OS if the process dies).
LOCK_NAME = ".train.lock"


@dataclass
class Engine:
    """Optimizer steps over a prepared model, optimizer and scheduler. With ``output_dir``: the run log, the
    ``config`` (``config.yaml``; ``train_config.yaml`` in each checkpoint) and checkpoints (``save_every``)."""

    accelerator: Any
    model: Any
    optimizer: Any
    scheduler: Any
    max_steps: int
    output_dir: Path | None = None
    config: dict[str, Any] | None = None
    stop_at: int | None = None  # stop early (with a checkpoint to resume from); None: max_steps
    max_grad_norm: float = 1.0  # 0: no clipping
    log_every: int = 10
    save_every: int = 0  # 0: no periodic checkpoints
    keep_checkpoints: int = 3
    tensorboard: bool = False
    progress: bool = True
    desc: str = "train"
    step: int = 0  # optimizer steps done
    last_good: Path | None = None  # newest checkpoint written or resumed from
    history: list[dict[str, float]] = field(default_factory=list)  # {"step", mean loss terms} of the steps run here
    logger: RunLogger | None = None
    main: bool = field(init=False)  # the main process (it logs and writes)
    _lock: Any = field(default=None, init=False, repr=False)  # on output_dir/.train.lock while running

    def __post_init__(self) -> None:
        self.stop_at = self.max_steps if self.stop_at is None else min(self.stop_at, self.max_steps)
        self.main = self.accelerator.is_main_process

    def start(self, resume: str | None = None) -> dict[str, Any]:
        """Lock ``output_dir`` (a second training into it is refused), resume (``"latest"`` or a folder), open the
        run log, write the config; returns ``trainer_state.json``."""
        created = self.output_dir is not None and not Path(self.output_dir).exists()
        if self.main and self.output_dir is not None:
            self._lock = take_lock(Path(self.output_dir) / LOCK_NAME,
                                   holder=f"another training is writing into {self.output_dir}")
        try:
            return self._start(resume)
        except BaseException:
            self.release_lock()
            if created and {p.name for p in Path(self.output_dir).iterdir()} <= {LOCK_NAME}:
                shutil.rmtree(self.output_dir, ignore_errors=True)  # a folder this run made and left empty
            raise

    def release_lock(self) -> None:
        """Let another training write into ``output_dir`` (after ``close``, or when this one failed)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _start(self, resume: str | None) -> dict[str, Any]:
        saved: dict[str, Any] = {}
        if resume:
            self.last_good = ckpt.resolve_resume(self.output_dir, resume)
            self.accelerator.load_state(str(self.last_good))
            saved = ckpt.read_state(self.last_good)
            self.step = int(saved["step"])
            self.accelerator.print(f"resumed from {self.last_good} at step {self.step}")
        self.logger = RunLogger(self.output_dir or ".", enabled=self.main and self.output_dir is not None,
                                tensorboard=self.tensorboard, resume_step=self.step if resume else None)
        if self.output_dir is not None:
            self.write_config(Path(self.output_dir) / "config.yaml")
        return saved

    def write_config(self, path: Path) -> None:
        if self.main and self.config is not None:
            import yaml

            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(self.config, sort_keys=False))

    def run(self, batches: Generator[Any, None, None], loss: Callable[[Any], dict[str, Any]],
            hooks: Hooks | None = None) -> None:
        """Optimizer steps up to ``stop_at`` over ``batches`` (a step ends where accelerate syncs gradients), each
        ``loss(micro_batch)`` scalar terms (``"loss"`` back-propagated); after a step: log, ``after_step``, checkpoint.
        A failure releases the ``output_dir`` lock."""
        try:
            self._run(batches, loss, hooks)
        except BaseException:
            self.release_lock()
            raise

    def _run(self, batches: Generator[Any, None, None], loss: Callable[[Any], dict[str, Any]],
             hooks: Hooks | None) -> None:
        from tqdm.auto import tqdm

        hooks = hooks or Hooks()
        acc = self.accelerator
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not (self.main and self.progress), desc=self.desc)
        parts: dict[str, list[float]] = {}  # loss terms of the micro-batches of the current optimizer step
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)  # gradients left on a model passed in do not leak into step 1
        for batch in batches if self.step < self.stop_at else ():
            with acc.accumulate(self.model):
                terms = loss(batch)
                self._check_finite(terms["loss"].detach(), "loss", hooks)
                acc.backward(terms["loss"])
                grad_norm = None
                if acc.sync_gradients and self.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
                    if acc.mixed_precision != "fp16":  # fp16 overflow is the grad scaler's to skip
                        self._check_finite(grad_norm.detach(), "gradient norm", hooks)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            for key, value in terms.items():
                parts.setdefault(key, []).append(float(acc.reduce(value.detach().float(), "mean")))
            if not acc.sync_gradients:
                continue  # gradient accumulation: not an optimizer step yet
            self.scheduler.step()
            self.step += 1
            row = {k: sum(v) / len(v) for k, v in parts.items()}
            parts = {}
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            self.history.append({"step": self.step, **row})
            if self.step % self.log_every == 0 or self.step == self.stop_at:
                self.logger.log("train", self.step, hooks.log_row(self, row, grad_norm))
            hooks.after_step(self)
            if (self.save_every and self.step % self.save_every == 0) or self.step == self.stop_at < self.max_steps:
                self.save_checkpoint(hooks)
            if self.step >= self.stop_at:
                break
        batches.close()  # end the generator (and a loader's iterator inside it) now
        bar.close()

    def close(self) -> None:
        """After the final save: close the run log, end the accelerator's run, release the ``output_dir`` lock."""
        self.logger.close()
        self.accelerator.end_training()
        self.release_lock()

    def _check_finite(self, value: Any, what: str, hooks: Hooks) -> None:
        """Stop every process together when any of them sees a non-finite ``value``."""
        import torch

        bad = torch.tensor([0.0 if torch.isfinite(value).all() else 1.0], device=self.accelerator.device)
        if float(self.accelerator.reduce(bad, reduction="sum")) > 0:
            keep = (f"the last good checkpoint is {self.last_good} (resume with --resume {self.last_good}, e.g. with "
                    f"a lower lr)" if self.last_good else "no checkpoint was saved before it")
            raise NonFiniteLossError(f"non-finite {what} ({float(value.float().sum())}) at step {self.step + 1}"
                                     f"{hooks.where()}; training stopped, {keep}")

    def save_checkpoint(self, hooks: Hooks) -> None:
        """Accelerate's state, the config, ``trainer_state.json`` last; older checkpoints pruned."""
        path = ckpt.checkpoint_dir(self.output_dir, self.step)
        quiet = logging.getLogger("accelerate.utils.other")  # "Removed shared tensor": tied modules reload fine
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        then = (f"; the last good checkpoint is {self.last_good} (free space, then --resume {self.last_good})"
                if self.last_good else "; no checkpoint was saved before it")
        try:
            with write_errors(path.parent, f"checkpoint {path.name}", then=then):
                self.accelerator.save_state(str(path))
                self.write_config(path / "train_config.yaml")
                if self.main:
                    ckpt.write_state(path, {"step": self.step, **hooks.position(), "max_steps": self.max_steps})
        except SetupError:
            if self.main and not (path / ckpt.STATE_FILE).is_file():
                shutil.rmtree(path, ignore_errors=True)  # never resumed from (no trainer_state.json): free its space
            raise
        finally:
            quiet.setLevel(level)
        if self.main:
            ckpt.prune_checkpoints(self.output_dir, keep=self.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        self.last_good = path
