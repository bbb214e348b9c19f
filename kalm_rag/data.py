"""Reading corpora and the BM25 first stage: the one data module of kalm-rag (evaluation, training, indexing).

- Row readers: :func:`read_jsonl` (plain or gzip), :func:`read_csv` and :func:`read_parquet` (through
  ``pyarrow``, imported on first use: ``pip install "kalm-rag[data]"``), and :func:`read_rows` /
  :func:`read_passages`, which pick one by the file's suffix.
- BEIR folders: :func:`load_beir` reads ``corpus.jsonl[.gz]`` (``_id``, ``title``, ``text``),
  ``queries.jsonl[.gz]`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``,
  ``score``, header line).
- :class:`BM25Index`: bm25s over a list of texts (``pip install "kalm-rag[eval]"``).
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from kalm_rag.errors import InvalidInputError, MissingDependencyError

#: Rows read per pyarrow batch by the Parquet reader.
BATCH_ROWS = 10_000


def _open_text(path: Path) -> IO[str]:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _first_existing(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}.jsonl[.gz] in {folder}")


# ----- row readers ---------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines file (gzip or plain)."""
    with _open_text(Path(path)) as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def _require_pyarrow(what: str) -> None:
    try:
        import pyarrow  # noqa: F401  (only its presence is checked here)
    except ModuleNotFoundError as exc:
        raise MissingDependencyError(f'reading {what} files needs pyarrow: pip install "kalm-rag[data]"') from exc


def read_csv(
    path: str | Path, *, delimiter: str | None = None, columns: Sequence[str] | None = None
) -> Iterator[dict[str, Any]]:
    """Rows of a CSV or TSV file with a header line (``.gz`` too), as dicts of strings, read in blocks by pyarrow.

    Args:
        path: the file; a ``.tsv`` name means tab-separated unless ``delimiter`` says otherwise.
        delimiter: the field separator (default ``","``, or a tab for ``.tsv``).
        columns: read only these columns (default: all).
    """
    _require_pyarrow("CSV")
    import pyarrow as pa
    from pyarrow import csv as pa_csv

    path = Path(path)
    if delimiter is None:
        delimiter = "\t" if ".tsv" in [s.lower() for s in path.suffixes] else ","
    with _open_text(path) as fh:  # the header, so that every column is read as text ("007" stays "007")
        names = next(csv.reader(fh, delimiter=delimiter), [])
    convert = pa_csv.ConvertOptions(
        column_types=dict.fromkeys(names, pa.string()), include_columns=list(columns) if columns else None
    )
    with pa_csv.open_csv(
        path, parse_options=pa_csv.ParseOptions(delimiter=delimiter), convert_options=convert
    ) as reader:
        for batch in reader:
            yield from batch.to_pylist()


def read_parquet(path: str | Path, *, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet file, as dicts, read in batches of :data:`BATCH_ROWS` by pyarrow."""
    _require_pyarrow("Parquet")
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(columns) if columns else None):
            yield from batch.to_pylist()


def read_rows(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines, CSV/TSV or Parquet file, chosen by its suffix (``.gz`` allowed but for Parquet)."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".json"):
        return read_jsonl(path)
    if kind in (".csv", ".tsv"):
        return read_csv(path)
    if kind in (".parquet", ".pq"):
        return read_parquet(path)
    raise InvalidInputError(f"cannot tell the format of {path}: expected .jsonl[.gz], .csv[.gz], .tsv[.gz] or .parquet")


@dataclass(frozen=True)
class Passage:
    """One passage of a corpus file: its id and the text rerankers see."""

    id: str
    text: str


def read_passages(
    path: str | Path, *, id_field: str = "_id", text_fields: Sequence[str] = ("title", "text")
) -> Iterator[Passage]:
    """The passages of a corpus file (JSON lines, CSV/TSV or Parquet): ``id_field`` and the ``text_fields`` joined.

    The defaults read a BEIR corpus (``_id``, ``title``, ``text``, joined as :func:`passage_text` does). A missing
    or empty text field is skipped; a row without an id or without any text is an error naming the file and row.
    """
    yield from _passages(read_rows(path), str(path), id_field, text_fields)


def _passages(
    rows: Iterable[dict[str, Any]], where: str, id_field: str, text_fields: Sequence[str]
) -> Iterator[Passage]:
    for n, row in enumerate(rows, start=1):
        if row.get(id_field) in (None, ""):
            raise InvalidInputError(f"{where}: row {n} has no {id_field!r} field")
        text = " ".join(str(row[f]).strip() for f in text_fields if row.get(f) not in (None, "")).strip()
        if not text:
            raise InvalidInputError(f"{where}: row {n} (id {row[id_field]!r}) has no text in {list(text_fields)}")
        yield Passage(str(row[id_field]), text)


# ----- BEIR folders --------------------------------------------------------------------------------


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
    corpus = {
        str(r["_id"]): passage_text(r.get("title"), r.get("text"))
        for r in read_jsonl(_first_existing(folder, "corpus"))
    }
    all_queries = {str(r["_id"]): r["text"] for r in read_jsonl(_first_existing(folder, "queries"))}
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    queries = {q: all_queries[q] for q in qrels if q in all_queries}
    candidates: dict[str, list[str]] | None = None
    if (folder / "candidates.tsv").is_file():
        candidates = {}
        with open(folder / "candidates.tsv", encoding="utf-8") as fh:
            reader = csv.reader(fh, delimiter="\t")
            next(reader)
            for row in reader:
                if row:
                    candidates.setdefault(row[0], []).append(row[1])
    return BeirDataset(name=name or folder.name, corpus=corpus, queries=queries, qrels=qrels, candidates=candidates)


# ----- BM25 ----------------------------------------------------------------------------------------


class BM25Index:
    """A bm25s index over a list of texts (English stopwords, lowercased)."""

    def __init__(self, texts: Sequence[str]) -> None:
        try:
            import bm25s
        except ModuleNotFoundError as exc:
            raise MissingDependencyError('the BM25 first stage needs bm25s: pip install "kalm-rag[eval]"') from exc

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
