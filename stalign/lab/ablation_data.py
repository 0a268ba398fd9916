"""The data of the ablation (:mod:`stalign.lab.ablation`): its synthetic slides and their shards (plain, and a
second prep of the same slides with Macenko stain normalisation to a training-site slide), and the SToFMs
pretrained on the training spots for the arms whose gene side is a frozen SToFM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stofm.util.errors import InputError


def slides_dir(s: Any) -> Path:
    """Where the synthetic slides of these settings (``AblationSettings``) live."""
    if s.version == 3:
        return s.out / f"slides_v3_{s.sites}x{s.slides_per_site}_{s.spots}_{s.um_per_px:g}um"
    return s.out / f"slides_{s.spots}_{s.um_per_px:g}um"


def make_data(s: Any) -> Path:
    """Synthetic slides (spot- and context-driven genes, known domains) and their shards, made once."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.lab.synth import ensure_synthetic_slide, make_synthetic_sites

    if s.version == 3:
        slides = make_synthetic_sites(slides_dir(s), n_sites=s.sites, slides_per_site=s.slides_per_site, seed=100,
                                      ensure=True, n_spots=s.spots, um_per_px=s.um_per_px, progress=s.progress)
    else:
        slides = [ensure_synthetic_slide(slides_dir(s), n_spots=s.spots, um_per_px=s.um_per_px, seed=100 + i,
                                         progress=s.progress) for i in range(s.slides)]
    samples = [read_anndata_image(x.paths["adata"], x.paths["image"], slide_id=x.slide_id) for x in slides]
    name = f"v3_{s.sites}x{s.slides_per_site}" if s.version == 3 else f"{s.slides}"
    root = s.out / f"shards_{name}x{s.spots}_{s.um_per_px:g}um_{s.genes}g_{s.patch_px}px"
    if not (root / "manifest.json").is_file():
        prepare(samples, root, n_top_genes=s.genes, crop=CropSpec(patch_px=s.patch_px), workers=1, progress=s.progress)
    return root


def stain_target(truth: Any, train: np.ndarray) -> str:
    """The slide the Macenko target is fitted on: the first (sorted) slide of the first training site, so the
    held-out site never sets the target."""
    first_site = sorted(set(truth.site[train]))[0]
    return sorted(set(truth.slide[train][truth.site[train] == first_site]))[0]


def stain_normalised(root: Path, target: str, out_dir: Path, *, synth_dir: Path | None = None,
                     progress: bool = False) -> Path:
    """A second prep of the slides of ``root`` (same panel, same crop sizes) with every crop Macenko-normalised to
    the stain of slide ``target`` (``CropSpec(stain_norm="macenko", stain_target=target)``), made once in
    ``out_dir``; the spots must be the plain prep's, in the same order (else an :class:`InputError`)."""
    from stalign.data.crop_spec import CropSpec
    from stalign.data.pipeline import prepare
    from stalign.data.readers import read_anndata_image
    from stalign.data.shards import read_manifest, read_shard
    from stalign.lab.synth_truth import _slide_h5ad

    manifest = read_manifest(root)
    spec = CropSpec.from_dict(manifest)
    if spec is None:
        raise InputError(f"{root}/manifest.json records no crop sizes; cannot prepare it again stain-normalised")
    out = out_dir / f"{root.name}_macenko_{target}"
    if not (out / "manifest.json").is_file():
        samples = []
        for entry in manifest["slides"]:
            h5ad = _slide_h5ad(entry, synth_dir)
            samples.append(read_anndata_image(h5ad, h5ad.with_suffix(".tif"), slide_id=entry["slide_id"]))
        prepare(samples, out, genes=manifest["genes"], crop=spec.with_overrides(stain_norm="macenko",
                                                                                 stain_target=target),
                workers=1, progress=progress)
    normed = read_manifest(out)
    for a, b in zip(manifest["slides"], normed["slides"], strict=False):
        same = a["slide_id"] == b["slide_id"] and list(read_shard(root / a["shard"])["barcodes"]) == \
            list(read_shard(out / b["shard"])["barcodes"])
        if not same:
            raise InputError(f"{out}: slide {b['slide_id']} keeps other spots than {root} (slide {a['slide_id']}); "
                             "the stain-normalised shards must hold the plain shards' spots")
    if len(manifest["slides"]) != len(normed["slides"]):
        raise InputError(f"{out}: {len(normed['slides'])} slides, {root}: {len(manifest['slides'])}")
    return out


#: (stofm model config, pretraining objective) of the frozen pretrained SToFM gene sides, by arm kind.
STOFM_MODELS = {"tiny": ("stofm-tiny", "project"), "original": ("stofm-original-tiny", "original")}


def pretrain_stofm(root: Path, truth: Any, train_idx: np.ndarray, out: Path, *, steps: int, seed: int,
                   kind: str = "tiny") -> Path:
    """A SToFM pretrained on the training spots' log1p expression (the shards' panel and units): ``kind`` "tiny",
    stofm-tiny with the project's MCM + PDR; "original", the original SToFM architecture (stofm-original-tiny)
    with the original's collator, heads and Leiden hypernodes (``objective: original``)."""
    import anndata as ad

    from stalign.data.dataset import ShardDataset
    from stofm.pretrain import PretrainConfig, pretrain

    model, objective = STOFM_MODELS[kind]
    expression = ShardDataset(root).expression_matrix()
    files = []
    for sid in np.unique(truth.slide[train_idx]):  # one AnnData per slide: SToFM tiles each slide on its own
        rows = train_idx[truth.slide[train_idx] == sid]
        a = ad.AnnData(X=expression[rows].astype(np.float32), obsm={"spatial": truth.coords_um[rows].astype(float)})
        a.var_names = list(truth.genes)
        path = out / f"{sid}.h5ad"
        path.parent.mkdir(parents=True, exist_ok=True)
        a.write_h5ad(path)
        files.append(str(path))
    cfg = PretrainConfig(data=files, output_dir=str(out / "run"), model=model, objective=objective,
                         input_kind="log1p", max_steps=steps, batch_size=4, lr=3e-3,
                         warmup_steps=max(1, steps // 10), cpu=True, seed=seed, save_every=0, keep_checkpoints=1,
                         progress=False, log_every=max(1, steps))
    return Path(pretrain(cfg)["model"])
