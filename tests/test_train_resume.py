"""Killed-and-resumed training continues exactly; a NaN loss stops with the step named and the last good checkpoint
kept; interrupted checkpoint folders are never resumed from."""
from __future__ import annotations

import csv

import pytest

TINY = "configs/tiny_test.yaml"


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(small_shards, tmp_path):
    from stalign.commands.train import main
    from stalign.training.trainer import train_from_config

    # 39 training spots / batch 8 = 4 batches per epoch: step 6 stops in the middle of epoch 1. Augmentation,
    # dropout and a validation pass before the stop are all on, so any RNG or data-order slip shows.
    common = {"data": str(small_shards("squidpy")), "max_steps": 10, "eval_every": 3, "save_every": 0,
              "augment": True}
    whole = train_from_config(TINY, output_dir=str(tmp_path / "whole"), **common)
    first = train_from_config(TINY, output_dir=str(tmp_path / "cut"), stop_after_steps=6, **common)
    assert first.step == 6 and first.checkpoint is None  # stopped early: no final weights yet
    assert (tmp_path / "cut" / "checkpoints" / "step_6" / "trainer_state.json").is_file()
    # the second leg goes through the command line, as a user would after a kill
    args = ["--config", TINY, "--resume", *(f"{k}={v}" for k, v in common.items()), f"output_dir={tmp_path / 'cut'}"]
    assert main(args) == 0

    log = list(csv.DictReader((tmp_path / "cut" / "train_log.csv").open()))
    assert [int(r["step"]) for r in log] == list(range(1, 11))
    resumed = {int(r["step"]): float(r["loss"]) for r in log}
    assert [resumed[s] for s, _ in whole.losses] == pytest.approx([loss for _, loss in whole.losses], abs=1e-6)
    assert resumed[7] == pytest.approx(dict(whole.losses)[7], abs=1e-6)  # the next-step loss after the resume
    a, b = _weights(tmp_path / "whole" / "final"), _weights(tmp_path / "cut" / "final")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(small_shards, tmp_path, monkeypatch,
                                                                          capsys):
    import torch

    import stalign.training.losses
    from stalign.commands.train import main
    from stofm.util import checkpointing

    real_forward = stalign.training.losses.ThreeTargetLoss.forward
    calls = {"n": 0}

    def poisoned(self, out, **kw):  # the 6th training batch (step 6) gets a NaN loss
        result = real_forward(self, out, **kw)
        calls["n"] += 1
        if calls["n"] == 6:
            result["loss"] = result["loss"] * torch.tensor(float("nan"))
        return result

    monkeypatch.setattr(stalign.training.losses.ThreeTargetLoss, "forward", poisoned)
    out = tmp_path / "run"
    code = main(["--config", TINY, f"data={small_shards('squidpy')}", f"output_dir={out}", "max_steps=10",
                 "save_every=2", "keep_checkpoints=5", "eval_every=0"])
    assert code == 1
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step_4"
    assert "non-finite loss (nan) at step 6" in err and str(good) in err
    assert checkpointing.list_checkpoints(out) == [out / "checkpoints" / "step_2", good]
    assert checkpointing.read_state(good)["step"] == 4
    assert not (out / "final").exists()
    # the kept checkpoint is usable: resuming from it (without the poison) finishes the run
    monkeypatch.setattr(stalign.training.losses.ThreeTargetLoss, "forward", real_forward)
    assert main(["--config", TINY, f"data={small_shards('squidpy')}", f"output_dir={out}", "max_steps=10",
                 "save_every=0", "eval_every=0", "--resume", str(good)]) == 0
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_ignores_interrupted_saves_and_reports_missing_ones(tmp_path):
    from stofm.util import checkpointing

    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        checkpointing.resolve_resume(tmp_path, "latest")
    for step in (3, 10, 7):
        path = checkpointing.checkpoint_dir(tmp_path, step)
        path.mkdir(parents=True)
        if step != 10:  # step 10 was killed before trainer_state.json was written
            checkpointing.write_state(path, {"step": step})
    assert checkpointing.resolve_resume(tmp_path, "latest").name == "step_7"
    with pytest.raises(FileNotFoundError, match="not a training checkpoint"):
        checkpointing.resolve_resume(tmp_path, str(checkpointing.checkpoint_dir(tmp_path, 10)))
    assert [p.name for p in checkpointing.prune_checkpoints(tmp_path, keep=1)] == ["step_3"]
    assert [p.name for p in checkpointing.list_checkpoints(tmp_path)] == ["step_7"]


def test_resume_latest_skips_a_damaged_checkpoint_with_a_warning(small_shards, tmp_path):
    """The newest checkpoint's model file is truncated (a crash or a full disk while copying): --resume falls back
    to the previous checkpoint with a warning instead of a traceback; naming the damaged one is an error."""
    from stalign.training.trainer import train_from_config
    from stofm.util import checkpointing

    common = {"data": str(small_shards("squidpy")), "max_steps": 4, "save_every": 2, "eval_every": 0,
              "keep_checkpoints": 0, "output_dir": str(tmp_path)}
    train_from_config(TINY, stop_after_steps=4, **{**common, "max_steps": 6})
    newest = checkpointing.checkpoint_dir(tmp_path, 4)
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors changed since it was saved" in checkpointing.check_checkpoint(newest)
    with pytest.warns(UserWarning, match=r"step_4 is damaged .*resuming from the older .*step_2"):
        assert checkpointing.resolve_resume(tmp_path, "latest").name == "step_2"
    with pytest.raises(ValueError, match="the checkpoint is damaged"):
        checkpointing.resolve_resume(tmp_path, str(newest))
    with pytest.warns(UserWarning, match="step_4 is damaged"):
        res = train_from_config(TINY, resume="latest", **{**common, "max_steps": 6})
    assert res.step == 6 and [s for s, _ in res.losses] == [3, 4, 5, 6]
