"""BEIR-format data sets and the BM25 first stage (bm25s), shared by training and evaluation.

A BEIR folder holds ``corpus.jsonl[.gz]`` (``_id``, ``title``, ``text``), ``queries.jsonl[.gz]``
(``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``, ``score``, header line).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _first_existing(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}.jsonl[.gz] in {folder}")


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a JSON-lines file (gzip or plain)."""
    with _open_text(Path(path)) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def passage_text(title: str | None, text: str | None) -> str:
    """The passage string given to rerankers for a BEIR document: ``title + " " + text``."""
    return f"{(title or '').strip()} {(text or '').strip()}".strip()


@dataclass
class BeirDataset:
    """A BEIR data set in memory.

    Attributes:
        corpus: document id -> passage text (title and text joined).
        queries: query id -> text.
        qrels: query id -> {document id: grade}, for the split asked for.
        candidates: query id -> candidate document ids from the data set itself (``candidates.tsv``), if any.
    """

    name: str
    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    candidates: dict[str, list[str]] | None = None
    doc_ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.doc_ids:
            self.doc_ids = list(self.corpus)


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``query-id -> {corpus-id: score}`` from a BEIR qrels TSV (header line skipped)."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t")
        header = next(reader)
        has_score = len(header) >= 3
        for row in reader:
            if not row:
                continue
            score = int(float(row[2])) if has_score and len(row) > 2 else 1
            qrels.setdefault(row[0], {})[row[1]] = score
    return qrels


def load_beir(folder: str | Path, split: str = "test", *, name: str | None = None) -> BeirDataset:
    """Load a BEIR folder (the queries kept are those with judgements in ``split``)."""
    folder = Path(folder)
    corpus = {str(r["_id"]): passage_text(r.get("title"), r.get("text")) for r in read_jsonl(_first_existing(folder, "corpus"))}
    all_queries = {str(r["_id"]): r["text"] for r in read_jsonl(_first_existing(folder, "queries"))}
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    queries = {q: all_queries[q] for q in qrels if q in all_queries}
    candidates = None
    if (folder / "candidates.tsv").is_file():
        candidates = {}
        with open(folder / "candidates.tsv", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter="\t")
            next(reader)
            for row in reader:
                if row:
                    candidates.setdefault(row[0], []).append(row[1])
    return BeirDataset(name=name or folder.name, corpus=corpus, queries=queries, qrels=qrels, candidates=candidates)


class BM25Index:
    """A bm25s index over a list of texts (English stopwords, lowercased)."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        self._bm25s = bm25s
        self.n = len(texts)
        tokens = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
        self.model = bm25s.BM25()
        self.model.index(tokens, show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` document indices and scores per query: ``(Q, k)`` arrays (score 0 = no match)."""
        k = min(k, self.n)
        tokens = self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        docs, scores = self.model.retrieve(tokens, k=k, show_progress=False)
        return np.asarray(docs), np.asarray(scores)
