"""``stalign fewshot``: fit an expression head on frozen image embeddings of labelled (shard) spots."""
from __future__ import annotations

import argparse

from stalign.commands.common_args import (
    add_cache_args,
    add_run_args,
    add_slide_source_args,
    check_at_least,
    read_slide_sample,
    sample_input,
)
from stalign.data.crop_spec import CropSpec
from stofm.util.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fewshot", help="few-shot head on frozen embeddings (expression probe/MLP head, or a "
                                       "prototype/logistic region-label classifier)",
                       description="Embed the spots of prepared shards with a trained model (encoders frozen), "
                                   "report cross-validated Pearson/MSE (folds by slide, or 5 spot folds for one "
                                   "slide) or, for region labels (--kind prototype|logistic --labels), stratified "
                                   "k-fold accuracy and balanced accuracy next to the majority-class baseline; "
                                   "then fit on every (labelled) spot and save the head for stalign predict. The "
                                   "spots come from shards (--shards) or from any slide input stalign prep reads.")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--shards", default=None,
                   help="labelled spots: shards folder (stalign prep --out); or one slide input below (its spots "
                        "and expression are prepared into OUT/shards with the model's crops)")
    add_slide_source_args(p, required=False)
    p.add_argument("--out", required=True, help="head folder to write")
    p.add_argument("--kind", choices=("ridge", "head", "finetune", "prototype", "logistic"), default="ridge",
                   help="ridge: PCA + ridge probe (HEST-style); head: small MLP on frozen embeddings; finetune: "
                        "MLP head trained through the image encoders (--unfreeze-last blocks trained too), "
                        "writes OUT/model (the fine-tuned checkpoint) beside the head; prototype (cosine to class "
                        "means) / logistic (logistic regression): region-label classifiers, need --labels")
    p.add_argument("--labels", default=None,
                   help="prototype/logistic: CSV with columns barcode,label (slide_id,barcode,label for several "
                        "slides); spots without a label are left out")
    p.add_argument("--unfreeze-last", type=int, default=2,
                   help="finetune: trainable last blocks per image trunk (default 2; 0 trains the head only)")
    p.add_argument("--lr", type=float, default=1e-3, help="finetune: head learning rate (encoder: lr / 100)")
    p.add_argument("--genes", nargs="+", default=None, help="genes the head predicts (default: the model's panel)")
    p.add_argument("--latent-dim", type=int, default=256, help="ridge: PCA components (256)")
    p.add_argument("--epochs", type=int, default=200, help="head: epochs (200; finetune: use a few)")
    p.add_argument("--hidden", type=int, default=256, help="head: hidden width (256)")
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds (default: by slide / 5)")
    add_run_args(p, seed=True)
    add_cache_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import stalign
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.fewshot import ExpressionHead, ExpressionProbe
    from stalign.tasks.fewshot_io import save_head
    from stalign.tasks.hest import cross_validate, group_splits
    from stalign.tasks.retrieval import gene_indices

    check_at_least(args, latent_dim=1, epochs=1, hidden=1, folds=2, batch_size=1)
    if args.labels and args.kind not in ("prototype", "logistic"):
        raise InputError(f"--labels {args.labels}: region labels need --kind prototype or logistic")
    model = None
    if _spots_source(args) != "--shards":
        model = stalign.load_checkpoint(args.model)
        args.shards = _prep_slide(args, model)
    if args.kind in ("prototype", "logistic"):
        return _labels(args, model)
    model = model or stalign.load_checkpoint(args.model)
    if args.kind == "finetune":
        return _finetune(args, model)
    emb = embed_shards(model, args.shards, gene=False, batch_size=args.batch_size, workers=args.workers,
                       device=args.device, progress=not args.quiet, cache=not args.no_cache)
    genes = args.genes or list(emb["genes"])
    y = emb["expression"][:, gene_indices(emb["genes"], genes, what="the shards")]
    x = emb["image"]

    def make():
        if args.kind == "ridge":
            return ExpressionProbe(genes=genes, latent_dim=args.latent_dim, seed=args.seed)
        return ExpressionHead(genes=genes, hidden=args.hidden)

    def fit(head, xs, ys):
        return head.fit(xs, ys, epochs=args.epochs, seed=args.seed) if args.kind == "head" else head.fit(xs, ys)

    slides = emb["slide_id"]
    if len(set(slides.tolist())) > 1:
        splits, how = group_splits(slides, n_splits=args.folds), "folds by slide"
    else:
        perm = np.random.default_rng(args.seed).permutation(len(x))
        splits, how = group_splits(perm, n_splits=args.folds or 5), "spot folds (one slide)"
    result = cross_validate(lambda tr, te: fit(make(), x[tr], y[tr]).predict(x[te]), y, splits, genes).summary()
    print(f"{args.kind} on {len(x)} spots, {len(genes)} genes, {result['n_folds']} {how}: Pearson "
          f"{result['pearson_mean']:.3f} ± {result['pearson_std']:.3f}, pooled {result['pooled_pearson_mean']:.3f}, "
          f"MSE {result['mse']:.3f}, MAE {result['mae']:.3f}")
    m = emb["manifest"]
    head = fit(make(), x, y)
    info = {"model": str(args.model), "shards": str(args.shards), **CropSpec.from_dict(m).to_dict(), "cv": result}
    print(f"head -> {save_head(head, args.out, embedding=info)}")
    return 0


def _spots_source(args: argparse.Namespace) -> str:
    """"--shards" or the slide input that gives the labelled spots (exactly one)."""
    given = sample_input(args)
    if args.slide:
        raise InputError(f"--slide {args.slide}: an image alone has no expression; give --shards or a slide input "
                         "with expression (--spaceranger, --hest, --h5ad + --image, --visium-hd)")
    if args.shards and given:
        raise InputError(f"give --shards or {given}, not both")
    if not args.shards and not given:
        raise InputError("give the labelled spots: --shards DIR, or --spaceranger, --hest, --h5ad + --image or "
                         "--visium-hd")
    return given or "--shards"


def _prep_slide(args: argparse.Namespace, model) -> str:
    """Prepare the slide input's spots into OUT/shards with the model's crops (``settle_crop``) and the panel genes
    the slide measures (or --genes); returns the folder."""
    from pathlib import Path

    from stalign.data.pipeline import prepare
    from stalign.tasks.predict import settle_crop

    sample, _ = read_slide_sample(args)
    measured = set(map(str, sample.adata.var_names))
    genes = args.genes or [g for g in model.genes if g in measured]
    if not genes:
        raise InputError(f"{sample.source_files[0]}: the slide measures none of the model's {len(model.genes)} panel "
                         f"genes (e.g. {list(model.genes)[:3]}); pass --genes")
    if len(genes) < len(model.genes) and not args.genes:
        print(f"note: {sample.slide_id} measures {len(genes)} of the model's {len(model.genes)} panel genes; the head "
              "is fitted on those")
    out = Path(args.out) / "shards"
    manifest = prepare([sample], out, genes=genes, crop=settle_crop(model), batch_size=args.batch_size,
                       progress=not args.quiet)
    print(f"{sum(s['n_spots'] for s in manifest['slides'])} spots x {len(genes)} genes of {sample.slide_id} -> {out}")
    return str(out)


def _labels(args: argparse.Namespace, model=None) -> int:
    import stalign
    from stalign.tasks.embed import embed_shards
    from stalign.tasks.fewshot import (
        LogisticProbe,
        PrototypeClassifier,
        cross_validate_labels,
        read_spot_labels,
    )
    from stalign.tasks.fewshot_io import save_head

    if not args.labels:
        raise InputError(f"--kind {args.kind} needs --labels FILE (CSV: barcode,label)")
    indices, labels = read_spot_labels(args.labels, args.shards)  # bad labels fail before the model loads
    model = model or stalign.load_checkpoint(args.model)
    emb = embed_shards(model, args.shards, indices=indices, gene=False, batch_size=args.batch_size,
                       workers=args.workers, device=args.device, progress=not args.quiet)

    def make():
        return PrototypeClassifier() if args.kind == "prototype" else LogisticProbe(seed=args.seed)

    cv = cross_validate_labels(make, emb["image"], labels, seed=args.seed)
    print(f"{args.kind} on {cv['n_spots']} labelled spots, {cv['n_classes']} classes, {cv['n_folds']} stratified "
          f"folds:\n{'':<28}{'accuracy':>10}{'balanced':>10}\n{args.kind:<28}{cv['accuracy']:>10.3f}"
          f"{cv['balanced_accuracy']:>10.3f}\n{'baseline (majority class)':<28}{cv['baseline_accuracy']:>10.3f}"
          f"{cv['baseline_balanced_accuracy']:>10.3f}")
    m = emb["manifest"]
    info = {"model": str(args.model), "shards": str(args.shards), "labels": str(args.labels),
            **CropSpec.from_dict(m).to_dict(), "cv": cv}
    print(f"head -> {save_head(make().fit(emb['image'], labels), args.out, embedding=info)}")
    return 0


def _finetune(args: argparse.Namespace, model) -> int:
    from pathlib import Path

    from stalign.data.shards import read_manifest
    from stalign.models.factory import save_checkpoint
    from stalign.tasks.fewshot import finetune_expression
    from stalign.tasks.fewshot_io import save_head
    from stalign.tasks.panel import with_gene_panel

    genes = [str(g) for g in read_manifest(args.shards)["genes"]]
    if list(model.genes) != genes:  # fine-tuning uses the image side only: carry it over to the shards' panel
        model = with_gene_panel(model, genes)
        print(f"note: the model's {len(model.genes)}-gene panel differs from the shards' {len(genes)} genes; its "
              "trained image side is fine-tuned on the shards' panel (its gene side is untrained: the saved model "
              "is for --fewshot-head predictions, not zero-shot retrieval)")
    head = finetune_expression(model, args.shards, genes=args.genes, unfreeze_last=args.unfreeze_last,
                               hidden=args.hidden, epochs=args.epochs, lr=args.lr, encoder_lr=args.lr / 100,
                               batch_size=args.batch_size, workers=args.workers, device=args.device, seed=args.seed,
                               progress=not args.quiet)
    out = Path(args.out)
    ckpt = save_checkpoint(model, out / "model")
    save_head(head, out, embedding={**head.embedding_info, "model": str(ckpt), "shards": str(args.shards)})
    print(f"fine-tuned {args.epochs} epochs (unfreeze_last={args.unfreeze_last}): training MSE "
          f"{head.history[0]:.3f} -> {head.history[-1]:.3f}")
    print(f"head -> {out}; model -> {ckpt} (use both: stalign predict --model {ckpt} --fewshot-head {out})")
    return 0
