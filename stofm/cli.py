"""The ``stofm`` command line: ``stofm pretrain-cells ...`` (masked-gene pretraining of the cell encoder),
``stofm pretrain --config ...`` (MCM + PDR), ``stofm embed IN --model M --out OUT``, ``stofm models``."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from stofm.util.errors import StalignError
from stofm.util.output_paths import atomic_write_path, refuse_overwriting_inputs


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; ``pretrain-cells``' flags (a torch-importing module) are added only when it is the command."""
    from stofm import __version__
    from stofm.pretrain import add_arguments, run_from_args

    parser = argparse.ArgumentParser(prog="stofm", description="SToFM: spatial transcriptomics foundation model")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("pretrain-cells", help="masked-gene pretraining (domain adaptation) of the BERT cell encoder")
    if argv and argv[0] == "pretrain-cells":
        from stofm.gene_pretrain import add_arguments as cell_arguments
        from stofm.gene_pretrain import run_from_args as run_cells

        cell_arguments(c)
        c.set_defaults(func=run_cells)
    p = sub.add_parser("pretrain", help="pretrain the SE(2) transformer (MCM + PDR) on AnnData slides")
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    e = sub.add_parser("embed", help="embed the cells of slides (AnnData) into obsm['X_stofm']")
    e.add_argument("inputs", nargs="+", help=".h5ad files with obsm['spatial']")
    e.add_argument("--model", required=True, help="config name, a save_pretrained folder or a stofm convert folder")
    e.add_argument("--out", required=True, help="output .h5ad (one input) or folder (several)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="sub-slices per forward pass (default 8; 2 for the original SToFM, whose Gaussian distance "
                        "features are dense: (batch, nodes, nodes, 128))")
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    e.add_argument("--niches", type=int, default=0, help="also store per-niche embeddings of this many cells")
    e.add_argument("--virtual-cells", type=int, default=None, help="virtual cells per slide (default: the model's)")
    e.add_argument("--cluster-method", choices=("kmeans", "leiden", "original"), default=None,
                   help="clustering for the virtual cells (default: the model config's; leiden and original, the "
                        "original SToFM's Leiden hypernodes, need pip install 'stalign[leiden]')")
    e.add_argument("--cells-per-tile", type=int, default=None, help="cells per sub-slice (default: the model's)")
    e.set_defaults(func=_embed)
    e.add_argument("--cell-embeddings", default=None, metavar="KEY",
                   help="precomputed cell embeddings in obsm[KEY] instead of the model's cell encoder")
    e.add_argument("--leiden-labels", default=None, metavar="COLUMN",
                   help="one virtual cell (hypernode) per cluster label of obs[COLUMN] (default: clustered)")
    c = sub.add_parser("convert", help="convert a released SToFM checkpoint (se2transformer.pth, cell_bert/) into "
                                       "a folder that stofm embed --model reads")
    c.add_argument("src", help="the original SE(2) state dict: se2transformer.pth (torch.save) or .safetensors")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--config", default=None, help="the original config.json (default: beside SRC, else from shapes)")
    c.add_argument("--heads", action="store_true", help="also keep the MCM/PDR heads (SToFMForMaskedLM keys)")
    c.add_argument("--cell-bert", default=None, help="the cell BERT folder (Hugging Face BertModel + cell_proj)")
    c.add_argument("--cell-proj", default=None, help="cell_proj.bin (default: inside --cell-bert)")
    c.set_defaults(func=_convert)
    m = sub.add_parser("models", help="list the registered model configs")
    m.set_defaults(func=_models)
    return parser


def _embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from stofm.embedding import embed, embed_niches
    from stofm.util.safe_files import read_h5ad

    out = Path(args.out)
    if len(args.inputs) > 1:
        out.mkdir(parents=True, exist_ok=True)
    dests = {f"--out (for {src})": out / Path(src).name for src in args.inputs} if len(args.inputs) > 1 else {}
    refuse_overwriting_inputs(dests, {f"input {i + 1}": src for i, src in enumerate(args.inputs)})  # before any work
    model = None
    kw = {"n_virtual": args.virtual_cells, "cluster_method": args.cluster_method, "cell_key": args.cell_embeddings,
          "labels_key": args.leiden_labels}
    for src in args.inputs:
        src = Path(src)
        adata = read_h5ad(src, what="stofm embed input")
        if model is None:
            model = _embed_model(args, list(map(str, adata.var_names)))
        batch_size = args.batch_size or (2 if model.arch == "original" else 8)
        try:
            embed(adata, model, batch_size=batch_size, dtype=args.dtype, cells_per_tile=args.cells_per_tile, **kw)
            if args.niches:
                embed_niches(adata, model, n_neighbors=args.niches, dtype=args.dtype, **kw)
        except StalignError as err:  # which input (of several) it was: NaN counts, no cells, ...
            raise type(err)(f"{src}: {err}") from None
        dest = out / src.name if len(args.inputs) > 1 else out
        with atomic_write_path(dest) as tmp:
            adata.write_h5ad(tmp)
        print(f"{src} -> {dest} obsm['X_stofm'] {adata.obsm['X_stofm'].shape}")
    return 0


def _embed_model(args: argparse.Namespace, genes: list[str]) -> Any:
    """The model of ``stofm embed --model``: a saved or converted folder, or a config name (random weights: a
    warning); a converted folder without its cell BERT needs ``--cell-embeddings``."""
    from pathlib import Path

    from stofm.model import create_model
    from stofm.original.convert import is_converted
    from stofm.util.errors import InputError

    if not Path(args.model).is_dir():
        import warnings

        warnings.warn(f"{args.model} is a config name: its weights are random (a smoke test, not SToFM); "
                      "embed with a pretrained folder (stofm pretrain, or stofm convert of the released "
                      "weights)", stacklevel=3)
    converted = is_converted(args.model)
    if converted and args.cell_embeddings:  # given cell embeddings: the folder's cell BERT is not needed
        return create_model(args.model, genes=genes, device=args.device or "cpu", cell_encoder_cfg={})
    model = create_model(args.model, genes=genes, device=args.device or "cpu")
    if converted and model.cell_encoder.kind != "geneformer":
        raise InputError(f"{args.model} has no cell BERT: give precomputed cell embeddings (--cell-embeddings KEY) "
                         "or convert with --cell-bert")
    return model


def _convert(args: argparse.Namespace) -> int:
    from stofm.original.convert import load_original, save_converted

    model = load_original(args.src, config=args.config, heads=args.heads)
    out = save_converted(model, args.out, cell_bert=args.cell_bert, cell_proj=args.cell_proj)
    cfg = getattr(model, "model", model).config
    print(f"{args.src} -> {out} (SToFM SE(2): {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads, FFN {cfg.ffn_embedding_dim}"
          f"{'; cell BERT ' + str(args.cell_bert) if args.cell_bert else ''})")
    return 0


def _models(args: argparse.Namespace) -> int:
    from stofm.model import list_models

    print("\n".join(list_models()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``stofm`` with ``argv``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    from stofm.util.cli_errors import run_parsed

    parser = build_parser(argv)
    return run_parsed(parser, parser.parse_args(argv), prog="stofm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
