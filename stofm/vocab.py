"""Gene vocabulary: gene names (Ensembl IDs or symbols) <-> token ids, with special tokens first.

Ids 0..3 are ``<pad>``, ``<cls>``, ``<mask>``, ``<unk>``; genes follow in the order given. Matching is
exact first, then falls back to the Ensembl ID without its version suffix (``ENSG...12.3`` ->
``ENSG...12``) and to a case-insensitive match when that is unambiguous.
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from stofm.util.errors import StofmError

SPECIAL_TOKENS = ("<pad>", "<cls>", "<mask>", "<unk>")
VOCAB_FORMAT = "stofm-gene-vocab"


class GeneVocabError(StofmError, ValueError):
    """A vocabulary file or a gene list could not be used."""


class UnknownGenesWarning(UserWarning):
    """Some genes are absent from the vocabulary (they are left out of the tokens)."""


def _strip_version(gene: str) -> str:
    if gene.upper().startswith("ENS") and "." in gene:
        return gene.split(".", 1)[0]
    return gene


class GeneVocab:
    """Token ids of genes; special tokens take ids 0..3 (pad=0, cls=1, mask=2, unk=3)."""

    pad_id, cls_id, mask_id, unk_id = 0, 1, 2, 3
    n_special = len(SPECIAL_TOKENS)

    def __init__(self, *, genes: Sequence[str]) -> None:
        genes = [str(g) for g in genes]
        if not genes:
            raise GeneVocabError("a gene vocabulary needs at least one gene")
        clash = sorted(set(genes) & set(SPECIAL_TOKENS))
        if clash:
            raise GeneVocabError(f"gene names may not be special tokens: {clash}")
        self._genes: list[str] = list(dict.fromkeys(genes))  # de-duplicated, order kept
        self._index = {g: i + self.n_special for i, g in enumerate(self._genes)}
        self._fallback: dict[str, int] = {}
        folded: dict[str, set[int]] = {}
        for g, i in self._index.items():
            for key in {_strip_version(g), _strip_version(g).upper()}:
                folded.setdefault(key, set()).add(i)
        self._fallback = {k: next(iter(v)) for k, v in folded.items() if len(v) == 1}

    # construction -------------------------------------------------------------------------------
    @classmethod
    def from_genes(cls, genes: Iterable[str]) -> GeneVocab:
        """A vocabulary of ``genes`` (duplicates kept once, first occurrence wins)."""
        return cls(genes=list(genes))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GeneVocab:
        """Read one gene per line, a JSON list, a JSON ``{gene: id}`` dict, or a file written by ``save``."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"gene vocabulary file not found: {path}")
        if path.suffix.lower() in (".pkl", ".pickle"):
            raise GeneVocabError(f"{path}: pickle files are not read (loading them can run code); convert it "
                                 "once to JSON, e.g. json.dump(pickle.load(f), open('genes.json', 'w'))")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise GeneVocabError(f"{path}: not a UTF-8 text/JSON gene list ({err})") from err
        if text.lstrip().startswith(("[", "{")):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as err:
                raise GeneVocabError(f"{path}: not valid JSON ({err})") from err
            genes = cls._genes_from_json(data, path)
        else:
            genes = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        try:
            return cls(genes=genes)
        except GeneVocabError as err:
            raise GeneVocabError(f"{path}: {err}") from err

    @staticmethod
    def _genes_from_json(data, path: Path) -> list[str]:
        if isinstance(data, list):
            return [str(g) for g in data]
        if isinstance(data, dict) and "genes" in data:
            return [str(g) for g in data["genes"]]
        if isinstance(data, dict):  # {gene: id} (Geneformer-style token dictionary)
            genes = [g for g in data if g not in SPECIAL_TOKENS and not g.startswith("<")]
            return sorted(genes, key=lambda g: data[g])
        raise GeneVocabError(f"{path}: expected a JSON list of genes or a {{gene: id}} object")

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (readable by ``from_file``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": VOCAB_FORMAT, "version": 1, "special_tokens": list(SPECIAL_TOKENS),
                   "genes": self._genes}
        path.write_text(json.dumps(payload), encoding="utf-8")
        return path

    # lookup -------------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """Gene names in id order (id = position + 4)."""
        return list(self._genes)

    def __len__(self) -> int:
        return len(self._genes) + self.n_special

    def __contains__(self, gene: object) -> bool:
        return isinstance(gene, str) and self._lookup(gene) != self.unk_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and other._genes == self._genes

    def __repr__(self) -> str:
        return f"GeneVocab({len(self._genes)} genes + {self.n_special} special tokens)"

    def _lookup(self, gene: str) -> int:
        gene = str(gene)
        hit = self._index.get(gene)
        if hit is None:
            key = _strip_version(gene)
            hit = self._fallback.get(key, self._fallback.get(key.upper(), self.unk_id))
        return hit

    def match(self, genes: Sequence[str], *, n_examples: int = 5) -> tuple[np.ndarray, int, list[str]]:
        """Ids of ``genes`` (``unk_id`` where absent), the number absent, and up to ``n_examples`` of them."""
        ids = np.fromiter((self._lookup(g) for g in genes), dtype=np.int64, count=len(genes))
        unknown = np.flatnonzero(ids == self.unk_id)
        return ids, int(unknown.size), [str(genes[i]) for i in unknown[:n_examples]]

    def encode(self, genes: Sequence[str], *, what: str = "genes") -> np.ndarray:
        """Ids of ``genes``; warns how many are unknown (with examples), raises when none match."""
        ids, n_unknown, examples = self.match(genes)
        if len(genes) and n_unknown == len(genes):
            raise GeneVocabError(
                f"none of the {len(genes)} {what} is in the vocabulary of {len(self._genes)} genes "
                f"(e.g. {examples}; vocabulary starts {self._genes[:3]}); Ensembl IDs vs symbols?")
        if n_unknown:
            warnings.warn(f"{n_unknown} of {len(genes)} {what} are not in the vocabulary and are left "
                          f"out of the tokens (e.g. {examples})", UnknownGenesWarning, stacklevel=2)
        return ids

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Names of token ids (special tokens by their symbol)."""
        table = list(SPECIAL_TOKENS) + self._genes
        return [table[int(i)] for i in ids]
