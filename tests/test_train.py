"""``stalign train`` pieces: run config resolution, AdamW groups + schedule, retrieval recall, CSV logs, and a
tiny end-to-end CPU run from real shards (squidpy crop + a synthetic slide) whose training loss falls."""
from __future__ import annotations

import csv
import itertools
import math

import pytest
import torch
import yaml

from stalign.training.config import ConfigError, TrainConfig, resolve_config
from stalign.training.metrics import chance_recall, recall_at_k, retrieval_metrics
from stofm.util.optim import (
    build_optimizer,
    build_scheduler,
    cosine_with_warmup,
    no_decay_parameter_names,
)
from stofm.util.runlog import RunLogger


def test_config_precedence_yaml_flags_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: shards/\nlr: 1e-3\nbatch_size: 8\nmax_steps: 50\nmodel_overrides: {dim: 32}\n")
    cfg = resolve_config(path, flags={"batch_size": "16", "cpu": True},
                         overrides=["max_steps=7", "model_overrides.depth=2", "betas=[0.8, 0.9]", "init=none"])
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)  # YAML's "1e-3" string is coerced
    assert cfg.batch_size == 16 and cfg.max_steps == 7 and cfg.cpu is True and cfg.init is None
    assert cfg.model_overrides == {"dim": 32, "depth": 2} and cfg.betas == [0.8, 0.9]
    written = _engine_writes(cfg, tmp_path / "out" / "config.yaml")
    assert resolve_config(written) == cfg  # the resolved file reproduces the run


@pytest.mark.parametrize("override, message", [
    ("max_step=1", "did you mean max_steps"), ("batch_size=two", "not a valid"), ("mixed_precision=fp8", "choose one of"),
    ("alpha=0.9", r"alpha \+ beta <= 1"), ("noequals", "key=value"), ("batch_size=1", "in-batch negatives"),
    ("split_by=random", "choose one of"),
])
def test_config_rejects_bad_values(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config({"data": "x"}, overrides=[override])


def test_config_split_by_block_is_accepted():
    assert resolve_config({"data": "x"}, overrides=["split_by=block"]).split_by == "block"


def test_config_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        resolve_config(tmp_path / "nope.yaml")


def test_shipped_configs_resolve():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    from stalign.models.factory import list_models

    known = list_models()
    for name in ("demo.yaml", "pretrain_base.yaml", "tiny_test.yaml"):
        cfg = resolve_config(root / name)
        assert isinstance(cfg, TrainConfig) and cfg.model in known, name


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.lin = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))
            self.pos_embed = torch.nn.Parameter(torch.zeros(1, 5, 4))
            self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)

    net = Net()
    skip = no_decay_parameter_names(net)
    assert skip >= {"emb.weight", "lin.bias", "norm.weight", "norm.bias", "conv.bias", "bn.weight", "bn.bias",
                    "logit_scale", "pos_embed"}
    assert "lin.weight" not in skip and "conv.weight" not in skip
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.1)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert decayed == {id(net.lin.weight), id(net.conv.weight)}  # frozen parameters are left out entirely
    assert sum(len(g["params"]) for g in opt.param_groups) == 11


def test_cosine_schedule_with_linear_warmup():
    f = cosine_with_warmup(warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    values = [f(s) for s in range(4, 15)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=14)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    for _ in range(9):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 5 / 10)))


def test_recall_at_k_by_hand_and_chance():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.2]])
    gene = torch.tensor([[1.0, 0.1], [1.0, 0.9], [0.0, 1.0], [-1.0, 0.0]])
    # cosine ranks of the true gene: image 0 -> 1st; image 1 -> 2nd (gene 2 is closer); image 2 -> 3rd (genes 1
    # and 0 are closer); image 3 -> 1st
    assert recall_at_k(img, gene, ks=(1, 2, 3)) == {1: 0.5, 2: 0.75, 3: 1.0}
    m = retrieval_metrics(img, gene, ks=(1, 10))
    assert m["image_to_gene_recall@1"] == 0.5 and m["chance@1"] == 0.25 and m["chance@10"] == 1.0
    assert chance_recall(100, 10) == 0.1
    collapsed = torch.ones(5, 3)  # everything equal: ties count against the query, recall 0 not 1
    assert recall_at_k(collapsed, collapsed, ks=(1,)) == {1: 0.0}


def test_csv_log_rows_new_columns_and_resume_truncation(tmp_path):
    log = RunLogger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        log.log("train", step, {"loss": 1.0 / step})
    log.log("train", 4, {"loss": 0.2, "grad_norm": 3.0})
    log.close()
    assert any((tmp_path / "tensorboard").iterdir())
    rows = list(csv.DictReader((tmp_path / "train_log.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"] and rows[3]["grad_norm"] == "3.0"
    RunLogger(tmp_path, tensorboard=False, resume_step=2).close()  # resuming from step 2 drops later rows
    assert [r["step"] for r in csv.DictReader((tmp_path / "train_log.csv").open())] == ["1", "2"]


def _engine_writes(cfg: TrainConfig, path):
    """``path`` as the training engine writes a run's config (``config.yaml``, ``train_config.yaml``)."""
    from stofm.util.train_engine import Engine, make_accelerator

    acc = make_accelerator(mixed_precision="no", seed=0, cpu=True)
    Engine(acc, None, None, None, max_steps=1, config=cfg.to_dict()).write_config(path)
    return path


def test_config_yaml_round_trip_is_plain_yaml(tmp_path):
    path = _engine_writes(TrainConfig(data="d"), tmp_path / "c.yaml")
    assert yaml.safe_load(path.read_text())["data"] == "d"


# ------------------------------------------------------------------------------------------ end to end
TINY = "configs/tiny_test.yaml"


@pytest.fixture()
def model_modules():
    """The real model factory module."""
    import stalign.models.factory as factory

    return factory


def _rows(path):
    return list(csv.DictReader(path.open()))


def test_train_cli_on_real_crop_loss_falls_and_writes_everything(small_shards, tmp_path, capsys, model_modules):
    from stalign.commands.train import main

    shards, out = small_shards("squidpy"), tmp_path / "run"
    code = main(["--config", TINY, f"data={shards}", f"output_dir={out}", "max_steps=80", "lr=1e-3",
                 "warmup_steps=10", "--no-augment", "--eval-every", "40", "--save-every", "40"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "held-out retrieval: image->gene R@1" in printed and "chance @1 0.100" in printed  # 10 held-out spots
    losses = [float(r["loss"]) for r in _rows(out / "train_log.csv")]
    assert len(losses) == 80
    # In-batch InfoNCE with 8 pairs starts near ln 8 = 2.08 (uniform); falling well below it means the real
    # crop's images and expression are being aligned, not just the temperature adjusted.
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < math.log(8) - 0.7 and last < first - 0.8, (first, last)
    val = _rows(out / "val_log.csv")
    assert [r["step"] for r in val] == ["40", "80"] and float(val[-1]["chance@10"]) == 1.0
    assert {"step_40", "step_80"} >= {p.name for p in (out / "checkpoints").iterdir()}
    assert resolve_config(out / "config.yaml").max_steps == 80
    final = out / "final"
    assert {"model.safetensors", "config.json", "train_config.yaml"} <= {p.name for p in final.iterdir()}
    model = model_modules.load_checkpoint(final)
    from stalign.data.dataset import ShardDataset

    assert model.genes == ShardDataset(shards).genes


def test_bad_inputs_give_clear_errors(small_shards, tmp_path, capsys, model_modules):
    from stalign.commands.train import main

    squidpy, synthetic = small_shards("squidpy"), small_shards("synthetic")
    base = ["--config", TINY, f"output_dir={tmp_path / 'x'}", "max_steps=1", "eval_every=0"]

    def error(*extra: str) -> str:
        assert main([*base, *extra]) == 1
        return capsys.readouterr().err

    assert "no shards at" in error(f"data={tmp_path / 'missing'}")
    assert "cannot fill one batch" in error(f"data={squidpy}", "batch_size=64")
    assert "nope" in error(f"data={squidpy}", "slides=[nope]")
    ckpt = tmp_path / "ckpt"
    model_modules.save_checkpoint(model_modules.create_model("stalign-tiny", genes=["a", "b", "c"]), ckpt)
    msg = error(f"data={synthetic}", f"--init={ckpt}")
    assert f"--init {ckpt}" in msg and "64-gene panel" in msg and "missing" in msg


def test_empty_batch_is_refused(small_shards, tmp_path, monkeypatch, model_modules):
    from stalign.data import dataset
    from stalign.training.data import EmptyDataError
    from stalign.training.trainer import train_from_config

    real = dataset.collate
    monkeypatch.setattr(dataset, "collate", lambda items: {k: v[:0] for k, v in real(items).items()})
    with pytest.raises(EmptyDataError, match="empty training batch at step 1"):
        train_from_config(TINY, data=str(small_shards("squidpy")), output_dir=str(tmp_path), max_steps=2)


def test_hard_negative_clusters_reach_the_loss(small_shards, tmp_path, monkeypatch, model_modules):
    import stalign.training.losses
    from stalign.data.dataset import ShardDataset
    from stalign.training.data import spot_clusters
    from stalign.training.trainer import train_from_config

    shards = small_shards("squidpy")
    ds = ShardDataset(shards, indices=list(range(0, 49, 2)))
    labels = spot_clusters(ds, n_clusters=4, n_total=49, seed=0)
    assert set(labels[0::2].tolist()) == {0, 1, 2, 3} and set(labels[1::2].tolist()) == {-1}
    seen = []
    real = stalign.training.losses.ThreeTargetLoss.forward

    def spy(self, out, **kw):
        seen.append(kw)
        return real(self, out, **kw)

    monkeypatch.setattr(stalign.training.losses.ThreeTargetLoss, "forward", spy)
    train_from_config(TINY, data=str(shards), output_dir=str(tmp_path), max_steps=2, eval_every=0,
                      hard_negative_clusters=4)
    seen = [kw for kw in seen if kw]  # training steps (the held-out loss takes no hard negatives)
    assert len(seen) == 2 and seen[0]["cluster"].shape == (8,) and seen[0]["slide_idx"].shape == (8,)
    assert 0 <= int(seen[0]["cluster"].min()) and int(seen[0]["cluster"].max()) < 4  # training spots only


def test_virtual_cells_come_from_training_spots_and_reach_the_se2_niche_encoder(small_shards, tmp_path,
                                                                                 model_modules):
    from stalign.data.dataset import ShardDataset, collate
    from stalign.training.data import VirtualCellBank, slide_virtual_cells
    from stalign.training.trainer import train_from_config

    shards = small_shards("squidpy")
    train, val = ShardDataset(shards, indices=range(0, 49, 2)), ShardDataset(shards, indices=range(1, 49, 2))
    bank = VirtualCellBank([train, val], n_slides=1, n_virtual=8, seed=0)
    expr, xy = slide_virtual_cells(train, 0, 8, seed=0)  # held-out spots never shape a trained slide's cells
    assert torch.allclose(bank.values[0], torch.from_numpy(expr)) and torch.allclose(bank.coords[0], torch.from_numpy(xy))
    out = bank.attach(collate([val[0], val[1]]))
    assert out["virtual_expr"].shape == (2, 8, 64) and out["virtual_coords"].shape == (2, 8, 2)
    assert bool(out["virtual_mask"].all())

    se2 = {"gene": {"niche": "se2", "niche_kwargs": {"dim": 32, "depth": 1, "heads": 2}}}
    first = {v: train_from_config(TINY, data=str(shards), output_dir=str(tmp_path / str(v)), max_steps=1,
                                  eval_every=0, virtual_cells=v, model_overrides=se2).losses[0][1] for v in (0, 8)}
    assert abs(first[8] - first[0]) > 1e-3, first  # same seed and data: only the virtual cells differ


def test_epochs_set_the_number_of_steps(small_shards, tmp_path, model_modules):
    from stalign.training.trainer import train_from_config

    # 39 training spots, batch 8 (drop_last) = 4 batches per epoch; grad_accum 2 -> 2 optimizer steps per epoch
    result = train_from_config(TINY, data=str(small_shards("squidpy")), output_dir=str(tmp_path), epochs=3,
                               grad_accum=2, eval_every=0, save_every=0)
    assert result.step == 6 and [s for s, _ in result.losses] == [1, 2, 3, 4, 5, 6]


def test_bf16_after_fp32_in_one_process_and_no_validation_split(small_shards, tmp_path, model_modules):
    from stalign.training.trainer import train_from_config

    for precision in ("no", "bf16"):  # accelerate's process-wide state is renewed between single-process runs
        result = train_from_config(TINY, data=str(small_shards("squidpy")), output_dir=str(tmp_path / precision),
                                   max_steps=2, mixed_precision=precision, val_fraction=0, grad_accum=2)
        assert result.step == 2 and result.metrics == {} and all(math.isfinite(v) for _, v in result.losses)
        assert (tmp_path / precision / "final" / "model.safetensors").is_file()
        assert not (tmp_path / precision / "val_log.csv").exists()


def test_shipped_configs_list_resolve_by_name_and_every_option_has_help(capsys):
    """Configs ship inside the package (a wheel has them), `--config NAME` finds them, `--list-configs` shows them,
    and every `stalign train` option says what it does."""
    from stalign.cli import build_parser, main
    from stalign.training.config import CONFIG_DIR, resolve_config, shipped_configs

    assert CONFIG_DIR.parent.name == "stalign" and {"demo", "hest_uni", "pretrain_base", "tiny_test"} <= set(
        shipped_configs())
    for name in shipped_configs():
        cfg = resolve_config(name)  # every shipped config is valid
        assert cfg.model
    assert resolve_config("demo").model == "stalign-demo" and resolve_config("hest_uni").mixed_precision == "bf16"
    assert main(["train", "--list-configs"]) == 0
    assert "hest_uni" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="shipped configs: .*demo"):
        resolve_config("nonexistent_config")
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    missing = [a.option_strings for a in train._actions if a.option_strings and not a.help]
    assert not missing, missing


def test_block_split_reports_the_spots_it_leaves_out(small_shards, capsys):
    from stalign.training.data import build_train_data

    data = build_train_data(root=small_shards("synthetic"), slides=None, val_fraction=0.2, split_by="block", seed=0,
                            niche_spots=4, train_transforms=None, eval_transforms=None, val_max_spots=0)
    from stalign.data.dataset import ShardDataset

    total = len(ShardDataset(small_shards("synthetic")))
    assert data.n_left_out > 0 and data.n_train + data.n_val + data.n_left_out == total
