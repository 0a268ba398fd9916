"""A trained model's image side over another gene panel, for few-shot work on data with other genes.

Few-shot heads and fine-tuning (``stalign.tasks.fewshot``) use only ``model.encode_image``, but the shard readers
check that the data's gene panel is the model's. ``with_gene_panel(model, genes)`` gives a model over ``genes``
whose image side carries the trained weights, e.g. the model ``make demo`` aligns on its synthetic slide,
fine-tuned on a few labelled spots of a Visium section (``notebooks/fewshot_finetune.ipynb``).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stalign.models.gene_panel import GenePanelError
from stofm.util.errors import InputError

GENE_SIDE = ("spot_gene_encoder.", "niche_gene_encoder.")  # modules whose inputs are the genes


def with_gene_panel(model: Any, genes: Sequence[str]) -> Any:
    """A new ``STAlign`` over ``genes``: the image encoders, tokenizers, heads, fusion and temperature are copies of
    ``model``'s trained weights, the gene encoders (their inputs are the genes) start untrained.

    ``encode_image`` of the result equals ``model``'s; ``encode_gene`` and zero-shot retrieval are meaningless until
    its gene side is trained (``stalign train init=...``). ``model`` is not changed.
    """
    from stalign.models.stalign_model import STAlign, STAlignConfig

    genes = [str(g) for g in genes]
    if not genes:
        raise GenePanelError("with_gene_panel needs a non-empty gene list")
    if len(set(genes)) != len(genes):
        dup = sorted({g for g in genes if genes.count(g) > 1})
        raise GenePanelError(f"with_gene_panel: genes listed twice: {dup[:10]}")
    config = model.config.to_dict()
    for key in ("spot_image", "niche_image"):
        config[key]["pretrained"] = None  # the trained weights are copied below, nothing is downloaded
    stofm_arch = getattr(model.spot_gene_encoder, "stofm_config", None)
    if stofm_arch is not None:  # the same SToFM architecture, untrained (as save_checkpoint records it)
        config["gene"]["encoder_kwargs"] = {"stofm_config": stofm_arch}
    new = STAlign(config=STAlignConfig.from_dict(config), genes=genes)
    target = new.state_dict()
    image_side = {k: v for k, v in model.state_dict().items() if not k.startswith(GENE_SIDE)}
    bad = sorted(k for k, v in image_side.items() if k not in target or target[k].shape != v.shape)
    if bad:
        raise InputError(f"with_gene_panel: {len(bad)} image-side weights do not fit the new model (e.g. {bad[:3]})")
    new.load_state_dict(image_side, strict=False)
    new.meta = {"name": model.meta.get("name"), "overrides": model.meta.get("overrides", {}),
                "image_side_from": model.meta.get("weights_sha256")}
    return new.to(next(model.parameters()).device).train(model.training)
