"""stalign checkpoints in the Hugging Face hub layout: a model card is written with every checkpoint,
``load_checkpoint("hf-hub:org/name")`` reads a local hub cache offline, and ``push_to_hub`` uploads the three files
(through a stand-in for the hub API: tests never touch the network)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import stalign
from stalign.models.factory import save_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = stalign.create_model("stalign-tiny", genes=[f"Gene{i}" for i in range(30)])
    return save_checkpoint(model, tmp_path / "ckpt", training={"data": "shards/x", "steps": 12, "spots": 400,
                                                               "metrics": {"image_to_gene_r@1": 0.25}})


def test_checkpoint_carries_a_model_card(ckpt):
    card = (ckpt / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: stalign")
    for needle in ("30 genes: Gene0, Gene1", "training steps | 12", "image_to_gene_r@1 | 0.25", "hf-hub:"):
        assert needle in card, needle


def test_load_checkpoint_by_hub_name_from_the_local_cache(ckpt, tmp_path, subprocess_env):
    repo = tmp_path / "home" / "hub" / "models--lab--stalign-tiny"
    snap = repo / "snapshots" / ("b" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    for name in ("config.json", "model.safetensors", "README.md"):
        (snap / name).write_bytes((ckpt / name).read_bytes())
    script = textwrap.dedent(f"""
        import torch, stalign
        hub = stalign.load_checkpoint("hf-hub:lab/stalign-tiny")
        local = stalign.load_checkpoint({str(ckpt)!r})
        assert hub.genes == local.genes
        assert all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), local.state_dict().values()))
        try:
            stalign.load_checkpoint("hf-hub:lab/not-there")
        except RuntimeError as err:
            print("ERR", err)
    """)
    env = {**subprocess_env, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "HF_HUB_OFFLINE" in res.stdout and "hf-hub:lab/not-there" in res.stdout


def test_push_to_hub_uploads_the_checkpoint(ckpt, monkeypatch, capsys):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, private, exist_ok):
            calls["repo"] = (repo_id, private)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, allow_patterns, commit_message):
            calls["files"] = sorted(p for p in os.listdir(folder_path) if p in allow_patterns)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from stalign.cli import main

    assert main(["push", str(ckpt), "--repo", "lab/mine"]) == 0
    assert calls["repo"] == ("lab/mine", True) and calls["files"] == ["README.md", "config.json", "model.safetensors"]
    assert "hf-hub:lab/mine" in capsys.readouterr().out
    assert main(["push", str(ckpt.parent), "--repo", "lab/mine"]) == 1  # not a checkpoint folder
