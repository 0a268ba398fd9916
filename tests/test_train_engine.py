"""The one training engine (``stofm.util.train_engine``) on a toy regression: accumulation, log rows, the config and
checkpoints, an exact resume after a stop, the non-finite stop naming the step and the last good checkpoint."""
from __future__ import annotations

import csv

import pytest
import torch

from stofm.util import checkpointing
from stofm.util.errors import NonFiniteLossError
from stofm.util.optim import build_scheduler
from stofm.util.train_engine import Engine, Hooks, make_accelerator


class _Where(Hooks):
    def where(self) -> str:
        return " (toy)"


def _run(out, *, stop_at=None, resume=None, save_every=0, poison_step=None):
    acc = make_accelerator(mixed_precision="no", grad_accum=2, cpu=True, seed=0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    sched = build_scheduler(opt, warmup_steps=1, total_steps=6)
    engine = Engine(acc, *acc.prepare(model, opt, sched), max_steps=6, output_dir=out, config={"toy": 1},
                    stop_at=stop_at, log_every=1, save_every=save_every, progress=False)
    engine.start(resume)

    def batches():
        while True:
            for micro in range(2):  # two micro-batches per optimizer step, drawn from (step, micro)
                x = torch.randn(4, 3, generator=torch.Generator().manual_seed(engine.step * 2 + micro))
                yield x, x.sum(1, keepdim=True)

    def loss(batch):
        x, y = batch
        value = ((engine.model(x) - y) ** 2).mean()  # dropout: the global RNG must resume too
        return {"loss": value * float("nan") if engine.step + 1 == poison_step else value, "mse": value}

    engine.run(batches(), loss, _Where())
    engine.close()
    return engine


def test_stop_and_resume_match_an_uninterrupted_run(tmp_path):
    whole = _run(tmp_path / "whole")
    assert [r["step"] for r in whole.history] == [1, 2, 3, 4, 5, 6]
    rows = list(csv.DictReader((tmp_path / "whole" / "train_log.csv").open()))
    assert list(rows[0]) == ["step", "loss", "mse", "lr"] and len(rows) == 6
    assert (tmp_path / "whole" / "config.yaml").read_text() == "toy: 1\n"
    assert not (tmp_path / "whole" / "checkpoints").exists()  # save_every=0, no early stop

    cut = _run(tmp_path / "cut", stop_at=3)
    assert cut.step == 3 and checkpointing.read_state(cut.last_good)["step"] == 3
    assert (cut.last_good / "train_config.yaml").is_file()
    resumed = _run(tmp_path / "cut", resume="latest")
    assert [r["step"] for r in resumed.history] == [4, 5, 6]
    assert [r["loss"] for r in cut.history + resumed.history] == [r["loss"] for r in whole.history]  # bit-identical
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "cut" / "train_log.csv").open())] == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_names_the_step_and_the_last_good_checkpoint(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 \(toy\); .*step_4"):
        _run(tmp_path, save_every=2, poison_step=5)
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_2", "step_4"]
