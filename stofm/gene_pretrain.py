"""Masked-gene modelling: BERT MLM on rank-value tokens, to adapt a ``BertCellEncoder`` to new counts.

15% of the gene tokens of each cell are chosen (never ``<cls>`` or padding); of those 80% become
``<mask>``, 10% a random gene, 10% stay; the encoder's hidden states predict the original gene ids
(cross-entropy), as in Geneformer's pretraining. Cells are tokenised batch by batch from dense, sparse
or backed AnnData matrices, so memory stays bounded.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stofm.cell_encoder import BertCellEncoder
from stofm.tokenize import InputKind
from stofm.util.errors import InputError
from stofm.util.optim import build_scheduler
from stofm.util.train_engine import Engine, make_accelerator
from stofm.vocab import GeneVocab

IGNORE = -100


class MaskedGeneHead(nn.Module):
    """Hidden states (B, L, width) -> logits over the vocabulary: Linear -> GELU -> LayerNorm -> Linear."""

    def __init__(self, *, width: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.decoder = nn.Linear(width, vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


def mask_gene_tokens(ids: torch.Tensor, pad_mask: torch.Tensor, *, vocab: GeneVocab, mask_prob: float = 0.15,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of gene tokens: returns (corrupted ids, labels with -100 where not chosen)."""
    if not 0.0 < mask_prob < 1.0:
        raise InputError(f"mask_prob must be in (0, 1), got {mask_prob}")
    dev = ids.device
    rand = lambda: torch.rand(ids.shape, generator=generator, device="cpu").to(dev)  # noqa: E731
    genes = ~pad_mask & (ids != vocab.cls_id)
    chosen = (rand() < mask_prob) & genes
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    action = rand()
    corrupted = torch.where(chosen & (action < 0.8), torch.full_like(ids, vocab.mask_id), ids)
    random_ids = torch.randint(vocab.n_special, len(vocab), ids.shape, generator=generator).to(dev)
    corrupted = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, corrupted)
    return corrupted, labels


def masked_gene_loss(encoder: BertCellEncoder, head: MaskedGeneHead, ids: torch.Tensor, pad_mask: torch.Tensor,
                     *, mask_prob: float = 0.15, generator: torch.Generator | None = None
                     ) -> dict[str, torch.Tensor]:
    """``{"loss": cross-entropy on the chosen tokens, "accuracy": top-1 accuracy there}``."""
    corrupted, labels = mask_gene_tokens(ids, pad_mask, vocab=encoder.vocab, mask_prob=mask_prob,
                                         generator=generator)
    chosen = labels != IGNORE
    if not chosen.any():  # tiny cells: force one token so the step has a target
        first = (~pad_mask & (ids != encoder.vocab.cls_id)).float().argmax(dim=1)
        has = (~pad_mask).sum(dim=1) > 1
        rows = torch.arange(ids.shape[0], device=ids.device)[has]
        labels[rows, first[has]] = ids[rows, first[has]]
        corrupted[rows, first[has]] = encoder.vocab.mask_id
        chosen = labels != IGNORE
    hidden = encoder.forward_tokens(corrupted, pad_mask)["hidden"]
    if not chosen.any():  # every cell of the batch is empty: nothing to predict, a zero loss in the graph
        return {"loss": hidden.sum() * 0.0, "accuracy": hidden.new_tensor(float("nan"))}
    logits = head(hidden[chosen]).float()
    loss = F.cross_entropy(logits, labels[chosen])
    return {"loss": loss, "accuracy": (logits.detach().argmax(-1) == labels[chosen]).float().mean()}


def _matrix_and_genes(data, genes: Sequence[str] | None, gene_key: str | None):
    if hasattr(data, "X") and hasattr(data, "var_names"):  # AnnData
        from stofm.embedding import adata_expression

        X, names = adata_expression(data, gene_key=gene_key)
        return X, list(names if genes is None else genes)
    if genes is None:
        raise InputError("pass genes=... with a matrix (they come from var_names only for AnnData)")
    return data, list(genes)


def pretrain_cell_encoder(data, genes: Sequence[str] | None, encoder: BertCellEncoder, *, steps: int = 1000,
                          batch_size: int = 32, lr: float = 1e-4, weight_decay: float = 0.01,
                          warmup: int | None = None, device: str | torch.device | None = None,
                          input_kind: InputKind = "counts", fit_medians: bool | None = None,
                          mask_prob: float = 0.15, gene_key: str | None = None, max_cells: int | None = None,
                          head: MaskedGeneHead | None = None, bf16: bool | None = None, seed: int = 0,
                          progress: bool = True) -> dict[str, list[float]]:
    """Masked-gene pretraining of ``encoder`` on an AnnData or a (cells, genes) matrix of counts.

    Medians are fitted on the data first when ``fit_medians`` (default: when the encoder has none).
    AdamW with warm-up + cosine decay to 0.1 × lr (``stofm.util.optim``), gradient clipping at 1, bf16 autocast
    (default: on CUDA only), on the shared training engine (``stofm.util.train_engine``). ``max_cells`` uses a random
    subset of the cells. Returns ``{"step", "loss", "accuracy", "lr"}`` per step; the encoder is trained in place
    (``head``, when given, too).
    """
    if not isinstance(encoder, BertCellEncoder):
        raise TypeError(f"masked-gene pretraining needs a BertCellEncoder, got {type(encoder).__name__}")
    X, genes = _matrix_and_genes(data, genes, gene_key)
    if X.shape[1] != len(genes):
        raise InputError(f"data has {X.shape[1]} genes but {len(genes)} gene names were given")
    if X.shape[0] == 0:
        raise InputError("no cells to pretrain on")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    accelerator = make_accelerator(mixed_precision="no", cpu=device.type == "cpu", seed=seed)
    rng = np.random.default_rng(seed)
    cells = np.arange(X.shape[0])
    if max_cells is not None and max_cells < len(cells):
        cells = np.sort(rng.choice(cells, size=max_cells, replace=False))
    if fit_medians or (fit_medians is None and not bool(encoder.medians_fitted)):
        encoder.fit_medians(X if max_cells is None else X[cells], genes, input_kind=input_kind)
    tokenizer = encoder.tokenizer()
    head = head or MaskedGeneHead(width=encoder.width, vocab_size=len(encoder.vocab))
    both = nn.ModuleDict({"encoder": encoder, "head": head}).to(device)
    optimizer = torch.optim.AdamW([p for p in both.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    scheduler = build_scheduler(optimizer, warmup_steps=max(1, steps // 10 if warmup is None else warmup),
                                total_steps=steps, min_lr_ratio=0.1)
    engine = Engine(accelerator, *accelerator.prepare(both, optimizer, scheduler, device_placement=[False] * 3),
                    max_steps=steps, max_grad_norm=1.0, progress=progress, desc="masked-gene pretraining")
    gen = torch.Generator().manual_seed(seed)
    use_bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
    lrs: list[float] = []  # the learning rate of each step

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # per-pass permutations of the cells
        order, pos = rng.permutation(cells), 0
        while True:
            if pos + batch_size > len(order):
                order, pos = rng.permutation(cells), 0
            ids, pad = tokenizer(X[np.sort(order[pos:pos + batch_size])], genes, input=input_kind)
            pos += batch_size
            yield ids.to(device), pad.to(device)

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        lrs.append(optimizer.param_groups[0]["lr"])
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return masked_gene_loss(encoder, head, *batch, mask_prob=mask_prob, generator=gen)

    engine.start()
    engine.run(batches(), loss)
    engine.close()
    both.eval()
    return {"step": [r["step"] - 1 for r in engine.history], "loss": [r["loss"] for r in engine.history],
            "accuracy": [r["accuracy"] for r in engine.history], "lr": lrs}


def _stack_on_common_genes(parts: list[tuple]) -> tuple:
    """Rows of several (matrix, genes) stacked over the genes all of them share (first one's order)."""
    import scipy.sparse as sp

    common = set(parts[0][1]).intersection(*(set(g) for _, g in parts[1:]))
    genes = [g for g in dict.fromkeys(parts[0][1]) if g in common]
    if not genes:
        raise InputError("the inputs share no gene names")
    blocks = []
    for X, names in parts:
        first = {g: i for i, g in reversed(list(enumerate(names)))}
        block = X[:, [first[g] for g in genes]]
        blocks.append(sp.csr_matrix(block))
    return sp.vstack(blocks, format="csr"), genes


def add_arguments(parser) -> None:
    """Arguments of the masked-gene pretraining command (for ``stofm``'s CLI)."""
    parser.add_argument("inputs", nargs="+", help=".h5ad or .zarr AnnData files of counts (cells x genes)")
    parser.add_argument("--out", required=True, help="output folder: the adapted cell encoder + pretrain_log.csv")
    parser.add_argument("--encoder", help="a save_cell_encoder folder to adapt (default: a new BertCellEncoder)")
    for flag, typ, default in (("--width", int, 256), ("--depth", int, 4), ("--heads", int, 4),
                               ("--max-len", int, 2048), ("--out-dim", int, 256), ("--steps", int, 1000),
                               ("--batch-size", int, 32),
                               ("--lr", float, 1e-4), ("--warmup", int, None), ("--max-cells", int, None),
                               ("--seed", int, 0)):
        parser.add_argument(flag, type=typ, default=default)
    parser.add_argument("--gene-key", help="var column with the gene names (default: var_names)")
    parser.add_argument("--layer", help="layer with the counts (default: X)")
    parser.add_argument("--input-kind", choices=("counts", "log1p"), default="counts")
    parser.add_argument("--refit-medians", action="store_true", help="refit the medians of a given --encoder")
    parser.add_argument("--device", default=None)


def run_from_args(args) -> int:
    """Read the inputs, pretrain, write ``args.out`` (``config.json``, ``model.safetensors``, ``pretrain_log.csv``)."""
    import csv
    from pathlib import Path

    from stofm.cell_encoder import load_cell_encoder, save_cell_encoder
    from stofm.embedding import adata_expression
    from stofm.util.safe_files import read_h5ad

    parts: list[tuple] = []
    for src in map(Path, args.inputs):
        adata = read_h5ad(src, what="masked-gene pretraining data")
        parts.append(adata_expression(adata, layer=args.layer, gene_key=args.gene_key, where=str(src)))
    X, genes = parts[0] if len(parts) == 1 else _stack_on_common_genes(parts)
    if args.encoder:
        encoder = load_cell_encoder(args.encoder)
    else:
        encoder = BertCellEncoder(genes=list(dict.fromkeys(genes)), width=args.width, depth=args.depth,
                                  heads=args.heads, max_len=args.max_len, out_dim=args.out_dim)
    hist = pretrain_cell_encoder(X, genes, encoder, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                 warmup=args.warmup, device=args.device, input_kind=args.input_kind,
                                 fit_medians=True if args.refit_medians else None, max_cells=args.max_cells,
                                 seed=args.seed)
    out = save_cell_encoder(encoder.cpu(), args.out)
    with open(out / "pretrain_log.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(list(hist))
        writer.writerows(zip(*hist.values()))
    print(f"masked-gene pretraining: loss {hist['loss'][0]:.3f} -> {hist['loss'][-1]:.3f}; encoder in {out}")
    return 0
