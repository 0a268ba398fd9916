"""Image-encoder specs users bring: ``hf-hub:org/name`` (loaded from a local Hugging Face cache, offline),
``NAME:/path/to/weights``, a bare weights file with ``--arch``, TRIDENT-style names; a hub failure is one line
that says what to do."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stalign.models.image_encoders import ALIASES, create_image_encoder, known_image_encoders

REPO = Path(__file__).resolve().parents[1]


def _hub_cache(home: Path) -> None:
    """A Hugging Face cache holding repo lab/tiny-path: a timm resnet18 trunk (config.json + model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=0)
    repo = home / "hub" / "models--lab--tiny-path"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    cfg = {"architecture": "resnet18", "num_classes": 0, "num_features": 512,
           "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                              "interpolation": "bilinear", "num_classes": 0}}
    (snap / "config.json").write_text(json.dumps(cfg))
    save_file(model.state_dict(), str(snap / "model.safetensors"))
    torch.save(model.conv1.weight.detach(), home / "probe.pt")


def test_hf_hub_spec_loads_from_the_local_cache_offline(tmp_path, subprocess_env):
    _hub_cache(tmp_path)
    script = textwrap.dedent("""
        import torch
        from stalign.models.image_encoders import create_image_encoder
        enc = create_image_encoder("hf-hub:lab/tiny-path")
        assert enc.out_dim == 512 and enc.mean == (0.5, 0.5, 0.5) and enc.interpolation == "bilinear"
        assert torch.equal(enc.trunk.conv1.weight, torch.load("probe.pt"))  # the cached weights, not random ones
        try:
            create_image_encoder("hf-hub:lab/gated-model")
        except RuntimeError as err:
            print("ERR", err)
    """)
    env = {**subprocess_env, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("ERR"))
    for needle in ("hf-hub:lab/gated-model", "https://huggingface.co/lab/gated-model", "HF_TOKEN", "HF_HUB_OFFLINE",
                   str(tmp_path / "hub")):
        assert needle in line, (needle, line)


def test_named_architecture_with_local_weights(fetched):
    weights = fetched("efficientnet-lite0") / "efficientnet-lite0-57934424.pth"
    named = create_image_encoder(f"efficientnet-lite0:{weights}")
    plain = create_image_encoder(str(weights), arch="efficientnet-lite0")
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(named.eval()(x), plain.eval()(x))
    with pytest.raises(ValueError, match=r"needs its architecture: --arch NAME .* NAME:"):
        create_image_encoder(str(weights))


def test_trident_names_are_aliases():
    assert ALIASES["uni_v1"] == "uni" and ALIASES["conch_v1"] == "conch" and ALIASES["uni_v2"] == "uni2"
    assert {"uni_v1", "hf-hub:<org>/<name>", "<name>:<local weights file>"} <= set(known_image_encoders())
    enc = create_image_encoder("resnet50", pretrained=False)
    assert enc.out_dim == 2048


def test_bench_takes_arch_for_a_bare_weights_file(small_shards, fetched, tmp_path, capsys):
    from stalign.cli import main

    weights = fetched("efficientnet-lite0") / "efficientnet-lite0-57934424.pth"
    args = ["bench", "--shards", str(small_shards("squidpy")), "--by", "spot", "--folds", "2", "--genes", "5",
            "--latent-dim", "8", "--quiet", "--encoders", str(weights)]
    assert main(args) == 1 and "needs its architecture" in capsys.readouterr().err
    assert main([*args, "--arch", "efficientnet-lite0", "--out", str(tmp_path / "b.csv")]) == 0
    assert (tmp_path / "b.csv").is_file()
    assert os.path.getsize(tmp_path / "b.csv") > 0
