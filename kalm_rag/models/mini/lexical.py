"""A lexical-match signal for kalm-mini: BM25 over the encoder's word pieces, IDF statistics shipped with the model.

The passage side already turns each passage into MiniLM word-piece ids (the windows the encoder reads), so a
bag-of-words match needs no second tokeniser: the score of a passage for a query is Okapi BM25 over the
query's distinct word pieces,

    bm25(q, p) = sum_{t in q} idf(t) * tf(t, p) / (tf(t, p) + k1 * (1 - b + b * |p| / avgdl))

with ``idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))`` (Lucene's BM25, as bm25s' ``method="lucene"``)
from document frequencies counted once over a fixed reference corpus and shipped as a small file next to the
weights (``lexical.safetensors``: one float per vocabulary entry, plus ``N`` and ``avgdl``). The score of a
passage therefore depends on the query and that passage only, never on the other candidates, so it can enter a
calibrated logit. Its normalised form divides by the value the query approaches when every term is matched many
times, ``sum_t idf(t)``: a number in [0, 1), "how much of the query's rare-word mass the passage holds".

The passage side never sees the query (FBNL): the passage contributes only its token counts.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kalm_rag.errors import ModelLoadError
from kalm_rag.threads import tokenizer_lock

#: File of the statistics inside a checkpoint folder.
LEXICAL_FILE = "lexical.safetensors"


@dataclass
class LexicalStats:
    """Document-frequency statistics of a reference corpus over a tokenizer's vocabulary.

    Attributes:
        idf: ``(V,)`` float32, Lucene's BM25 IDF of every vocabulary id (ids never seen get the largest).
        num_docs: documents counted.
        avgdl: their mean length in word pieces.
        k1, b: BM25's saturation and length-normalisation parameters.
        sources: what was counted (names of the corpora), for the model card.
        unit: ``"piece"`` (ids are word pieces) or ``"word"`` (ids are :func:`word_buckets` of whole words).
    """

    idf: torch.Tensor
    num_docs: int
    avgdl: float
    k1: float = 1.5
    b: float = 0.75
    sources: tuple[str, ...] = ()
    unit: str = "piece"

    @classmethod
    def count(
        cls,
        documents: Iterable[Sequence[int]],
        *,
        vocab_size: int,
        ignore_ids: Iterable[int] = (),
        k1: float = 1.5,
        b: float = 0.75,
        sources: Sequence[str] = (),
        unit: str = "piece",
    ) -> LexicalStats:
        """Statistics of ``documents`` (each a sequence of token ids), ids in ``ignore_ids`` left out."""
        ignore = set(int(i) for i in ignore_ids)
        df = torch.zeros(vocab_size, dtype=torch.float64)
        n, total = 0, 0
        for ids in documents:
            kept = [int(i) for i in ids if int(i) not in ignore]
            n += 1
            total += len(kept)
            if kept:
                df[torch.tensor(sorted(set(kept)))] += 1
        if n == 0:
            raise ValueError("no documents to count")
        idf = torch.log1p((n - df + 0.5) / (df + 0.5)).float()  # (V,)
        return cls(idf, n, total / n, k1, b, tuple(sources), unit)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``lexical.safetensors`` into ``folder`` (IDF as a tensor, the rest as metadata)."""
        from safetensors.torch import save_file

        path = Path(folder) / LEXICAL_FILE
        meta = {
            "num_docs": str(self.num_docs),
            "avgdl": repr(self.avgdl),
            "k1": repr(self.k1),
            "b": repr(self.b),
            "sources": json.dumps(list(self.sources)),
            "unit": self.unit,
        }
        save_file({"idf": self.idf.float().contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> LexicalStats:
        """Read ``lexical.safetensors`` from a checkpoint folder."""
        from safetensors import safe_open

        path = Path(folder) / LEXICAL_FILE
        if not path.is_file():
            raise ModelLoadError(f"no lexical statistics in {folder} ({LEXICAL_FILE} needed)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta: dict[str, Any] = fh.metadata() or {}
                idf = fh.get_tensor("idf").float()
            return cls(
                idf,
                int(meta["num_docs"]),
                float(meta["avgdl"]),
                float(meta["k1"]),
                float(meta["b"]),
                tuple(json.loads(meta.get("sources", "[]"))),
                meta.get("unit", "piece"),
            )
        except (KeyError, ValueError, OSError) as exc:
            raise ModelLoadError(f"{path}: not a readable lexical statistics file ({exc})") from exc


#: Whole words are hashed into this many buckets (a word-level vocabulary without shipping the words).
WORD_BUCKETS = 1 << 18
_PRIME = (1 << 61) - 1


def continuation_mask(tokenizer: Any) -> list[bool]:
    """Per vocabulary id: whether the piece continues a word (WordPiece's ``##`` prefix)."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    return [str(p).startswith("##") for p in pieces]


def word_buckets(piece_ids: Sequence[int], continuation: Sequence[bool], buckets: int = WORD_BUCKETS) -> list[int]:
    """Whole words of a word-piece sequence (a piece and the ``##`` pieces after it), each hashed to a bucket.

    A one-piece word maps to ``piece id + 1`` (no collision among them); longer words to a polynomial hash of
    their pieces. Deterministic across processes and Python versions.
    """
    out: list[int] = []
    h: int | None = None
    for i in piece_ids:
        i = int(i)
        if h is not None and continuation[i]:
            h = (h * 1_000_003 + i + 1) % _PRIME
            continue
        if h is not None:
            out.append(h % buckets)
        h = i + 1
    if h is not None:
        out.append(h % buckets)
    return out


def bm25_scores(query_ids: Sequence[int], passages_ids: Sequence[Sequence[int]], stats: LexicalStats) -> torch.Tensor:
    """Okapi BM25 ``(N,)`` of each passage's token ids for the query's distinct token ids (see the module doc).

    Ids outside the statistics' vocabulary, and ids of the query the statistics ignore, contribute nothing.
    """
    V = stats.idf.shape[0]
    terms = sorted({int(i) for i in query_ids if 0 <= int(i) < V})
    out = torch.zeros(len(passages_ids), dtype=torch.float32)
    if not terms:
        return out
    idf = stats.idf[torch.tensor(terms)]  # (Tq,)
    index = {t: j for j, t in enumerate(terms)}
    tf = torch.zeros((len(passages_ids), len(terms)), dtype=torch.float32)  # (N, Tq)
    lengths = torch.empty(len(passages_ids), dtype=torch.float32)  # (N,)
    for row, ids in enumerate(passages_ids):
        lengths[row] = len(ids)
        for t, c in Counter(int(i) for i in ids).items():
            j = index.get(t)
            if j is not None:
                tf[row, j] = c
    norm = stats.k1 * (1 - stats.b + stats.b * lengths / stats.avgdl)  # (N,)
    return (idf * tf / (tf + norm[:, None])).sum(dim=1)  # (N,)


def max_bm25(query_ids: Sequence[int], stats: LexicalStats) -> float:
    """The bound BM25 approaches for the query's distinct ids: ``sum_t idf(t)`` (0 for no known id)."""
    V = stats.idf.shape[0]
    terms = sorted({int(i) for i in query_ids if 0 <= int(i) < V})
    return float(stats.idf[torch.tensor(terms)].sum()) if terms else 0.0


class LexicalScorer:
    """BM25 of texts over a tokenizer's word pieces with shipped statistics (an experiment-side convenience).

    Args:
        tokenizer: a Hugging Face tokenizer (kalm-mini's: MiniLM's lowercasing word-piece tokenizer).
        stats: the shipped :class:`LexicalStats`.
        ignore_ids: ids never matched (the special tokens).
        max_tokens: passage tokens read (as the encoder reads at most this many).
    """

    def __init__(self, tokenizer: Any, stats: LexicalStats, *, ignore_ids: Iterable[int], max_tokens: int) -> None:
        self.tokenizer, self.stats, self.max_tokens = tokenizer, stats, max_tokens
        self.ignore = {int(i) for i in ignore_ids}
        self.continuation = continuation_mask(tokenizer) if stats.unit == "word" else None

    @classmethod
    def from_pretrained(
        cls, name_or_path: str = "kalm-mini", *, stats: str | os.PathLike[str] | None = None, max_tokens: int = 1024
    ) -> LexicalScorer:
        """The scorer of a kalm-mini checkpoint (the embedded one for ``"kalm-mini"``); ``stats``: a folder
        holding ``lexical.safetensors`` (default: the checkpoint's own).
        """
        from kalm_rag.models.mini.backend import EMBEDDED_DIR, load_encoder, read_checkpoint

        folder = EMBEDDED_DIR if name_or_path == "kalm-mini" else Path(name_or_path)
        config, _, _ = read_checkpoint(folder)
        _, tokenizer = load_encoder(config, device=torch.device("cpu"), dtype=torch.float32)
        lexical = LexicalStats.load(folder if stats is None else stats)
        return cls(tokenizer, lexical, ignore_ids=tokenizer.all_special_ids, max_tokens=max_tokens)

    def ids(self, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
        """Word-piece ids of each text (no special tokens), cut to ``max_tokens``."""
        with tokenizer_lock(self.tokenizer):
            enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
        ids = [[i for i in row if i not in self.ignore] for row in enc["input_ids"]]
        if self.continuation is not None:
            ids = [word_buckets(row, self.continuation, self.stats.idf.shape[0]) for row in ids]
        return ids

    def scores(self, query: str, passages: Sequence[str], *, normalised: bool = False) -> list[float]:
        """BM25 of each passage for ``query`` (``normalised``: divided by :func:`max_bm25`, in [0, 1))."""
        q = self.ids([query], 512)[0]
        s = bm25_scores(q, self.ids(passages, self.max_tokens), self.stats)
        if normalised:
            top = max_bm25(q, self.stats)
            s = s / top if top > 0 else s
        return s.tolist()


__all__ = [
    "LEXICAL_FILE",
    "WORD_BUCKETS",
    "LexicalScorer",
    "LexicalStats",
    "bm25_scores",
    "continuation_mask",
    "max_bm25",
    "word_buckets",
]
