"""with_gene_panel: a trained model's image side over another gene panel (few-shot work on other genes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import stalign
from stalign.data.shards import read_manifest
from stalign.models.gene_panel import GenePanelError
from stalign.tasks.fewshot import finetune_expression
from stalign.tasks.panel import with_gene_panel


def _trained_tiny(genes):
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=genes)
    with torch.no_grad():  # stand-in for training: every weight moved away from its initial value
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_image_side_kept_gene_side_new():
    model = _trained_tiny([f"a{i}" for i in range(12)])
    new = with_gene_panel(model, [f"b{i}" for i in range(7)])
    assert new.genes == [f"b{i}" for i in range(7)] and model.genes[0] == "a0"
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(new.eval().encode_image(x, x), model.encode_image(x, x), atol=1e-6)
    old = model.state_dict()
    gene_keys = [k for k in new.state_dict() if k.startswith("spot_gene_encoder.")]
    assert gene_keys and any(k not in old or old[k].shape != new.state_dict()[k].shape
                             or not torch.equal(old[k], new.state_dict()[k]) for k in gene_keys)
    assert new.meta["image_side_from"] == model.meta.get("weights_sha256")


def test_bad_genes_are_one_line_errors():
    model = _trained_tiny(["a", "b"])
    with pytest.raises(ValueError, match="non-empty"):
        with_gene_panel(model, [])
    with pytest.raises(ValueError, match="twice"):
        with_gene_panel(model, ["x", "x"])


def test_finetune_on_shards_of_another_panel(small_shards):
    shards = small_shards("squidpy")
    genes = list(read_manifest(shards)["genes"])
    model = _trained_tiny([f"other{i}" for i in range(10)])
    with pytest.raises(GenePanelError):
        finetune_expression(model, shards, epochs=1, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = with_gene_panel(model, genes)
    head = finetune_expression(new, shards, indices=list(range(8)), unfreeze_last=1, epochs=2, encoder_lr=1e-2,
                               progress=False)
    assert len(head.history) == 2 and np.isfinite(head.history).all()
    moved = [k for k, v in new.state_dict().items() if k.startswith("spot_image_encoder.") and not torch.equal(v, before[k])]
    assert moved  # the last block of the image trunk was trained
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the source model is untouched


def test_fewshot_finetune_command_takes_a_model_of_another_panel(small_shards, tmp_path, capsys):
    from stalign.cli import main
    from stalign.models.factory import save_checkpoint
    from stalign.tasks.fewshot_io import load_head

    shards = small_shards("squidpy")
    ckpt = save_checkpoint(_trained_tiny([f"other{i}" for i in range(10)]), tmp_path / "model")
    assert main(["fewshot", "--model", str(ckpt), "--shards", str(shards), "--out", str(tmp_path / "ft"), "--kind",
                 "finetune", "--unfreeze-last", "1", "--epochs", "1", "--hidden", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "gene panel differs" in out and "training MSE" in out
    saved = stalign.load_checkpoint(tmp_path / "ft" / "model")
    assert saved.genes == list(read_manifest(shards)["genes"])
    assert load_head(tmp_path / "ft").genes == saved.genes
