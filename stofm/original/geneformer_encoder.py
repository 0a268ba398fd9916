"""The original SToFM cell encoder (``CellBert``: Geneformer rank-value tokens -> Hugging Face ``BertModel`` -> ``<cls>``
-> ``Linear`` -> L2 norm) as a project cell-encoder kind (``"geneformer"``), so an ``SToFM`` built from a ``stofm
convert`` folder with a cell BERT, ``stofm.embed`` and pretraining use it. Needs ``transformers``.

Its genes are the token dictionary's genes that have a median. Tokens depend only on the order of count / median
within a cell (Geneformer's division by the cell's total is a per-cell scale), so log1p cp10k input gives the same
tokens as counts (it is expm1'ed first) up to exact ties.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stofm.cell_encoder import CellEncoder, check_expr, register_cell_encoder
from stofm.original.cell_bert import CellBert, GeneformerTokenizer
from stofm.util.errors import InputError, MissingDependencyError


@register_cell_encoder("geneformer")
class GeneformerCellEncoder(CellEncoder):
    """``bert_config``: a ``BertConfig`` dict; ``token_dict`` / ``medians``: Geneformer's dictionaries (JSON-able, so
    ``save_pretrained`` keeps them in ``config.json``); ``out_dim``: the projection's width."""

    def __init__(self, *, bert_config: dict[str, Any], token_dict: dict[str, int], medians: dict[str, float],
                 out_dim: int = 256, genes: list[str] | None = None) -> None:
        super().__init__()
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            raise MissingDependencyError("the SToFM cell BERT needs transformers: pip install 'stalign[geneformer]'") from None
        self.tokenizer = GeneformerTokenizer(token_dict, medians)
        self.genes = [g for g in token_dict if g in medians]
        if not self.genes:
            raise InputError("the Geneformer token and median dictionaries share no gene")
        cfg = BertConfig(**bert_config)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.proj = nn.Linear(cfg.hidden_size, int(out_dim))
        self.out_dim = int(out_dim)
        self.config = {"bert_config": dict(bert_config), "token_dict": dict(token_dict), "medians": dict(medians),
                       "out_dim": self.out_dim}

    @classmethod
    def from_cell_bert(cls, cell: CellBert) -> GeneformerCellEncoder:
        """The same weights and dictionaries as a loaded ``CellBert`` (``stofm.original.cell_bert.load_cell_bert``)."""
        if cell.tokenizer is None:
            raise InputError("the cell BERT was loaded without its Geneformer dictionaries")
        enc = cls(bert_config=cell.bert.config.to_dict(), token_dict=cell.tokenizer.token_dict,
                  medians=cell.tokenizer.medians, out_dim=cell.proj.out_features)
        enc.bert.load_state_dict(cell.bert.state_dict())
        enc.proj.load_state_dict(cell.proj.state_dict())
        return enc

    def forward(self, expr: torch.Tensor, *, input_kind: str = "counts") -> torch.Tensor:
        """(B, out_dim) L2-normalised embeddings of ``expr`` (B, G) over ``self.genes`` (counts or log1p)."""
        check_expr(expr, len(self.genes))
        if input_kind not in ("counts", "log1p"):
            raise InputError(f"input_kind must be 'counts' or 'log1p', got {input_kind!r}")
        x = torch.expm1(expr.double()) if input_kind == "log1p" else expr.double()
        tokens = self.tokenizer.rank_tokens(x.cpu().numpy(), self.genes)
        batch = self.tokenizer.batch([np.asarray(t, np.int64) for t in tokens])
        dev = self.proj.weight.device
        hidden = self.bert(input_ids=batch["input_ids"].to(dev),
                           attention_mask=batch["attention_mask"].to(dev)).last_hidden_state
        return F.normalize(self.proj(hidden[:, 0]), dim=-1)
