"""Embeddings from a trained model: image embeddings of slide crops (parallel slide readers), and image +
gene embeddings of prepared shards (for reference banks, few-shot training and benchmarks)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from stalign.models.perf import FastEmbedder, resolve_device
from stalign.tasks.crop_reading import SlideCrops, crop_batches, reading_plan, torch_threads
from stalign.tasks.retrieval import ReferenceBank

__all__ = ["SlideCrops", "bank_from_shards", "embed_shards", "embed_slide_crops", "load_reference"]


def shard_batches(ds: Any, *, batch_size: int, workers: int):
    """Collated batches of the ``ShardDataset`` ``ds`` in its order (``workers`` spawned reader processes; 0: read
    in this process)."""
    import torch

    from stalign.data.dataset import collate

    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                                       collate_fn=collate, multiprocessing_context="spawn" if workers > 0 else None)


def embed_slide_crops(model: Any, crops: SlideCrops, *, batch_size: int = 32, workers: int = 0,
                      device: str | None = None, niche_weight: float = 0.5, progress: bool = True,
                      precision: str = "auto", compile: bool | str = "auto") -> np.ndarray:
    """(N, E) image embeddings (``model.encode_image``) of the crops on the fast path of
    ``stalign.models.perf.FastEmbedder`` (bf16 autocast etc. on CUDA; plain fp32 on the CPU), read beside the
    model as ``reading_plan`` says: ``workers`` reader processes on a GPU, ``workers`` reader threads on the CPU
    (the model then runs on the cores they leave), in the main thread for ``workers=0``."""
    from tqdm import tqdm

    device = resolve_device(device)
    plan = reading_plan(device, workers)
    embedder = FastEmbedder(model=model, device=device, precision=precision, compile=compile, n_items=len(crops))
    batches = crop_batches(crops, batch_size=batch_size, plan=plan, pin_memory=str(device).startswith("cuda"))
    out = []
    with torch_threads(plan["torch_threads"]):
        for batch in tqdm(batches, total=-(-len(crops) // batch_size), desc="embedding crops",
                          disable=not progress, unit="batch"):
            out.append(embedder(batch["spot_image"], batch["niche_image"], niche_weight=niche_weight).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def embed_shards(model: Any, root: str | os.PathLike, *, slides: Sequence[str] | None = None,
                 indices: Sequence[int] | None = None, batch_size: int = 32, workers: int = 0,
                 device: str | None = None, niche_weight: float = 0.5, gene: bool = True,
                 progress: bool = True, precision: str = "auto", cache: Any = True) -> dict[str, Any]:
    """Image (and gene) embeddings of shard spots, with their expression, slide ids and coordinates.

    With ``gene=True`` the shards' gene panel must be the model's (``GenePanelMismatchError`` otherwise); image
    embeddings alone (``gene=False``) take shards of any panel. ``precision``: see
    ``stalign.models.perf.autocast_dtype`` (bf16 on CUDA, fp32 on the CPU by default). Whole shards go through
    the feature store (``cache``: on, off (``--no-cache``) or a ``FeatureStore``; ``stalign.tasks.feature_store``):
    embedded once per (model weights, settings, crop spec, shard), read back afterwards; a subset ``indices`` is
    embedded directly.
    """
    from stalign.data.crop_spec import shard_crops
    from stalign.data.dataset import ShardDataset
    from stalign.tasks.feature_store import model_identity, open_store

    ds = ShardDataset(root, slides=slides, indices=indices)
    shard_crops(ds.manifest, root, model)
    if gene:
        model.check_genes(ds.genes, source=f"the shards under {root}")
    device = resolve_device(device)
    run = {"batch_size": batch_size, "workers": workers, "device": device, "niche_weight": niche_weight,
           "gene": gene, "progress": progress, "precision": precision}
    outputs = ["image", "gene"] if gene else ["image"]
    store = open_store(root, cache)
    offsets = np.cumsum([e["n_spots"] for e in ds.manifest["slides"]])
    of_spot = np.searchsorted(offsets, ds.indices, side="right")
    chosen = [int(k) for k in of_spot[np.sort(np.unique(of_spot, return_index=True)[1])]]  # in dataset order
    if indices is not None or not store.enabled:
        arrays = _embed_dataset(model, ds, **run)
        store.computed += len(chosen)
    else:
        identity = model_identity(model, device=device, precision=precision, niche_weight=niche_weight,
                                  niche_spots=ds.niche_spots)
        arrays = store.per_shard(identity, outputs, [ds.slide_ids[k] for k in chosen],
                                 lambda sid: _embed_dataset(model, ShardDataset(root, slides=[sid]), **run))
    if progress and store is not cache:  # a store of its own: say what was reused
        store.log(store.summary())
    coords = np.zeros((len(ds), 2), np.float32)
    for k in chosen:  # slide_spots: the slide's spots in dataset order
        coords[of_spot == k] = ds.slide_spots(k)["coords_um"]
    return {"image": arrays["image"], "gene": arrays["gene"] if gene else None,
            "expression": ds.expression_matrix(), "genes": ds.genes,
            "slide_id": np.asarray(ds.slide_ids, dtype=object)[of_spot].astype(str), "coords_um": coords,
            "manifest": ds.manifest, "store": store}


def _embed_dataset(model: Any, ds: Any, *, batch_size: int, workers: int, device: str, niche_weight: float,
                   gene: bool, progress: bool, precision: str) -> dict[str, np.ndarray]:
    """``image`` (and ``gene``) embeddings of every item of ``ds``, in its order."""
    from tqdm import tqdm

    from stalign.models.perf import inference_context

    image, genes_emb = [], []
    with inference_context(model, device, precision):  # model moved in place, eval, autocast
        for batch in tqdm(shard_batches(ds, batch_size=batch_size, workers=workers),
                          desc="embedding shards", disable=not progress, unit="batch"):
            b = {k: v.to(device) for k, v in batch.items()}
            image.append(model.encode_image(b["spot_image"], b["niche_image"], niche_weight=niche_weight)
                         .float().cpu().numpy())
            if gene:
                genes_emb.append(model.encode_gene(b, niche_weight=niche_weight).float().cpu().numpy())
    out = {"image": np.concatenate(image)}
    if gene:
        out["gene"] = np.concatenate(genes_emb)
    return out


def bank_from_shards(model: Any, root: str | os.PathLike, **embed: Any) -> ReferenceBank:
    """A reference bank of the shards' gene embeddings (``model.encode_gene``) and their expression; its ``info``
    records the shards' crop spec (the crops a query must be cut with) and each slide's pixel size (``um_per_px``,
    for the reference/query checks of ``stalign.tasks.query_checks``)."""
    from stalign.data.crop_spec import CropSpec

    emb = embed_shards(model, root, gene=True, **embed)
    m = emb["manifest"]
    return ReferenceBank(embeddings=emb["gene"], expression=emb["expression"], genes=emb["genes"],
                         meta={"slide_id": emb["slide_id"], "x_um": emb["coords_um"][:, 0],
                               "y_um": emb["coords_um"][:, 1]},
                         info={"source": str(Path(root).resolve()), **CropSpec.from_dict(m).to_dict(),
                               "expression": m.get("expression"), "model": getattr(model, "meta", {}).get("name"),
                               "model_weights_sha256": getattr(model, "meta", {}).get("weights_sha256"),
                               "um_per_px": {str(s["slide_id"]): float(s["um_per_px"]) for s in m["slides"]}})


def load_reference(reference: Any, model: Any, **embed: Any) -> ReferenceBank:
    """A ``ReferenceBank`` from a bank, a saved bank folder, or a shards folder (embedded with ``model`` through the
    feature store: embedded once, reused by later runs; ``cache=False`` bypasses it); its gene panel must be the
    model's."""
    from stalign.tasks.query_checks import open_reference

    summary = open_reference(reference)  # a bank as it is, a saved bank loaded, a shards folder's manifest read
    bank = summary.bank if summary.bank is not None else bank_from_shards(model, reference, **embed)
    bank.check_genes(model.genes, what="the model")
    bank.check_model(model)
    return bank
