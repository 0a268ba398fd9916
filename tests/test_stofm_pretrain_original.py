"""``stofm pretrain`` with the original SToFM objective (``objective: original``, configs/stofm_original_tiny.yaml):
its batches and losses equal the original code's on the golden fixture; a short run on the Visium crop trains
(finite, falling loss) and its checkpoint loads back."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "stofm_original_tiny.yaml"
FIX = REPO.parent / "shared" / "fixtures" / "stofm_original"
SE2 = FIX / "se2"
needs_fixture = pytest.mark.skipif(not (SE2 / "state_dict.safetensors").is_file(),
                                   reason=f"golden fixtures of the original SToFM not found at {FIX} (a user's checkout)")


def _np(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@needs_fixture
def test_original_objective_gives_the_original_losses_on_the_fixture(tmp_path):
    """Slice A's first two sub-slices through the pretraining path (tile_subslices -> masked_batch with the fixture's
    seed -> OriginalPretrainLoss on create_model(<converted folder>)) = the original collator's batch and the MCM / PDR
    losses and outputs the original SToFMForMaskedLM computed."""
    from safetensors.torch import save_file

    from stofm.model import create_model
    from stofm.objectives_original import OriginalPretrainLoss, masked_batch, mlm_outputs, tile_subslices
    from stofm.original.convert import load_original, save_converted

    sd = {**{f"model.{k}": torch.from_numpy(v) for k, v in _np(SE2 / "state_dict.safetensors").items()},
          **{k: torch.from_numpy(v) for k, v in _np(SE2 / "heads_state_dict.safetensors").items()}}
    save_file(sd, str(tmp_path / "w.safetensors"))
    folder = save_converted(load_original(tmp_path / "w.safetensors", config=SE2 / "config.json", heads=True),
                            tmp_path / "conv")
    model = create_model(folder, genes=["a", "b"], cell_encoder_cfg={"kind": "mlp", "hidden": 4, "depth": 1}).eval()
    pre, ref, want = (_np(SE2 / f"{n}.safetensors") for n in ("preprocess_sliceA", "inputs_mlm", "outputs_mlm"))
    slide = SimpleNamespace(coords=torch.from_numpy(pre["norm_spatial"]), cell_emb=torch.from_numpy(pre["cell_emb"]),
                            virtual_coords=torch.from_numpy(pre["hyper_spatial"]),
                            virtual_emb=torch.from_numpy(pre["hyper_emb"]),
                            tiles=[pre[f"sub{i}.cell_indices"] for i in (0, 1)])
    batch = masked_batch(tile_subslices(slide), seed=1234)
    for key in ("token_embeddings", "labels", "token_types"):
        np.testing.assert_allclose(batch[key].numpy(), ref[key], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(batch["pair_labels"].numpy(), ref["pair_labels"], rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        out = mlm_outputs(model, batch)
        terms = OriginalPretrainLoss(mcm_weight=1.0, pdr_weight=0.5)(model, batch)
    np.testing.assert_allclose(out["logits"].numpy(), want["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["pair_pred"].numpy(), want["pair_pred"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(terms["mcm_loss"]), float(want["loss"][0]), rtol=1e-4)
    np.testing.assert_allclose(float(terms["pdr_loss"]), float(want["pair_loss"][0]), rtol=1e-4)
    assert float(terms["loss"]) == pytest.approx(float(want["loss"][0]) + 0.5 * float(want["pair_loss"][0]), rel=1e-4)


def test_original_objective_trains_and_its_checkpoint_loads_back(squidpy_crop, tmp_path):
    from stofm.model import create_model
    from stofm.pretrain import load_config, pretrain

    cfg = load_config(CONFIG, data=[str(squidpy_crop / "test_data.h5ad")], output_dir=str(tmp_path / "run"),
                      progress=False, log_every=5, max_steps=40, save_every=20, warmup_steps=2, lr=3e-3)
    assert (cfg.model, cfg.objective) == ("stofm-original-tiny", "original")
    res = pretrain(cfg)
    losses = [r["loss"] for r in res["losses"]]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:8]), losses  # the loss falls
    assert np.mean([r["mcm_loss"] for r in res["losses"][-8:]]) < np.mean([r["mcm_loss"] for r in res["losses"][:8]])
    assert (tmp_path / "run" / "checkpoints" / "step_20").is_dir()
    loaded = create_model(res["model"])
    assert loaded.arch == "original" and loaded.config["geometry"] == "bbox"
    from safetensors.torch import load_file

    saved = load_file(str(Path(res["model"]) / "model.safetensors"))
    assert set(saved) == set(loaded.state_dict())
    assert any(k.startswith("se2.model.encoder.layers.1.self_attn.k_proj") for k in saved)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_original_objective_needs_the_original_architecture(squidpy_crop, tmp_path):
    from stofm.pretrain import load_config, pretrain

    cfg = load_config(CONFIG, data=[str(squidpy_crop / "test_data.h5ad")], output_dir=str(tmp_path / "x"),
                      model="stofm-tiny", progress=False, max_steps=1)
    with pytest.raises(ValueError, match="needs a stofm-original model"):
        pretrain(cfg)
    with pytest.raises(ValueError, match="objective"):
        load_config(CONFIG, objective="mlm")
    full = load_config(REPO / "configs" / "stofm_original.yaml")  # the released shape's run config parses
    assert (full.model, full.objective, full.cluster_method, full.cells_per_tile) == (
        "stofm-original", "original", "original", 1000)
