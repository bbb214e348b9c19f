"""Reading corpora and the BM25 first stage: the one data module of kalm-rag (evaluation, training, indexing).

- Row readers: :func:`read_jsonl` (plain or gzip), :func:`read_csv` and :func:`read_parquet` (through
  ``pyarrow``, imported on first use: ``pip install "kalm-rag[data]"``), and :func:`read_rows` /
  :func:`read_passages`, which pick one by the file's suffix.
- Corpora to index: :func:`corpus_files` (a file, a folder of files, or a BEIR folder) and :func:`read_texts`,
  the passage texts with where each comes from; every error names the file and line (or row).
- :func:`passage_text`: the one join of a title and a text (the indexer, the adapters and BEIR all use it).
- BEIR folders: :func:`load_beir` reads ``corpus.jsonl[.gz]`` (``_id``, ``title``, ``text``),
  ``queries.jsonl[.gz]`` (``_id``, ``text``) and ``qrels/<split>.tsv`` (``query-id``, ``corpus-id``,
  ``score``, header line).
- :class:`BM25Index`: bm25s over a list of texts (``pip install "kalm-rag[eval]"``).
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import zlib
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
    inside = sorted(p.parent for p in folder.glob(f"*/{stem}.jsonl*"))  # e.g. wikiqa/test: the split's folder
    hint = f" (did you mean {inside[0]}?)" if inside else ""
    raise FileNotFoundError(f"no {stem}.jsonl[.gz] in {folder}{hint}")


# ----- row readers ---------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSON-lines file (gzip or plain); blank lines are skipped.

    Raises:
        InvalidInputError: a line that is not a JSON object, or a file that cannot be decoded (the message
            names the file and line).
    """
    for _, row in read_jsonl_numbered(path):
        yield row


def read_jsonl_numbered(
    source: str | Path | IO[bytes], *, name: str | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for each non-blank line of a JSON-lines file (gzip or plain), numbered from 1.

    The one JSON-lines reader of kalm-rag (``kalm-rag index``, ``kalm-rag rerank``, the BEIR loader): every line
    is decoded on its own, so an error names the very line where it is.

    Args:
        source: a file path (``.gz``: gzip), or an open binary stream such as ``sys.stdin.buffer``.
        name: what errors call the source (default: the path, or ``"stdin"`` for a stream).

    Raises:
        InvalidInputError: a line that is not a JSON object (``path:line: not JSON ...``), text that is not
            UTF-8 (``path:line: not UTF-8 text ...``), or a damaged gzip stream.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
            yield from _numbered_rows(fh, name or str(path))
    else:
        yield from _numbered_rows(source, name or "stdin")


def _numbered_rows(fh: Iterable[bytes], name: str) -> Iterator[tuple[int, dict[str, Any]]]:
    n = 0
    try:
        for n, raw in enumerate(fh, start=1):  # noqa: B007  (n names the line of a damaged gzip stream)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidInputError(f"{name}:{n}: not UTF-8 text ({exc.reason} at byte {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInputError(f"{name}:{n}: not JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise InvalidInputError(f"{name}:{n}: a line must be a JSON object, got {type(row).__name__}")
            yield n, row
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise InvalidInputError(f"{name}: damaged gzip file after line {n} ({exc})") from None


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
        parts = [str(row[f]) for f in text_fields if row.get(f) not in (None, "")]
        text = functools.reduce(passage_text, parts).strip() if parts else ""
        if not text:
            raise InvalidInputError(f"{where}: row {n} (id {row[id_field]!r}) has no text in {list(text_fields)}")
        yield Passage(str(row[id_field]), text)


def passage_text(title: str | None, text: str | None) -> str:
    """The passage text of a document with a title: ``title + " " + text``; the text alone when there is no title.

    The one join of kalm-rag (public as ``kalm_rag.index.passage_text``): ``kalm-rag index --title-field``, the
    framework adapters' ``title_key`` option and the BEIR loader all call it, so that the same document gives
    the same passage text, hence the same store key, through every entry point. With a title, both parts are
    stripped and joined by one space; without one (``None``, empty or blank) the text is returned unchanged,
    exactly as the adapters and the service send a document that has no title.

    Args:
        title: the document's title, or ``None``.
        text: the document's text (``None`` is taken as empty).

    Returns:
        The passage text.

    Example:
        >>> passage_text("Paris", "Paris is the capital of France. ")
        'Paris Paris is the capital of France.'
        >>> passage_text(None, " Bananas are yellow.")
        ' Bananas are yellow.'
    """
    text = "" if text is None else text
    if title is None or not title.strip():
        return text
    return f"{title.strip()} {text.strip()}".strip()


# ----- corpora to index ----------------------------------------------------------------------------

#: File names a corpus folder may hold (other files, and names starting with a dot, are ignored).
CORPUS_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet", ".pq")


def corpus_files(path: str | Path) -> list[Path]:
    """The files of a corpus: the file itself, a BEIR folder's ``corpus.jsonl[.gz]``, or a folder's corpus files.

    A folder that holds ``corpus.jsonl`` or ``corpus.jsonl.gz`` is a BEIR folder: only that file is read (not its
    queries). Any other folder gives its JSON-lines, CSV/TSV and Parquet files (see :data:`CORPUS_SUFFIXES`),
    sorted by name, not recursing into sub-folders.

    Raises:
        InvalidInputError: the path does not exist, or the folder holds no corpus file.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InvalidInputError(f"corpus {path} does not exist")
    for name in ("corpus.jsonl.gz", "corpus.jsonl"):
        if (path / name).is_file():
            return [path / name]
    found = sorted(
        p
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(CORPUS_SUFFIXES)
    )
    if not found:
        raise InvalidInputError(f"corpus folder {path} holds no .jsonl[.gz], .csv[.gz], .tsv[.gz] or .parquet file")
    return found


def _located_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, row)`` for each row of a corpus file: ``file:line`` for JSON lines, ``file: row N`` otherwise."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    kind = suffixes[-1] if suffixes else ""
    if kind in (".jsonl", ".json"):
        for n, row in read_jsonl_numbered(path):
            yield f"{path}:{n}", row
        return
    try:
        for n, row in enumerate(read_rows(path), start=1):
            yield (f"{path}: row {n} (line {n + 1})" if kind in (".csv", ".tsv") else f"{path}: row {n}"), row
    except (InvalidInputError, MissingDependencyError):
        raise
    except Exception as exc:  # pyarrow's ArrowInvalid and OSError: a malformed file or one that cannot be read
        raise InvalidInputError(f"{path}: cannot read it as {kind[1:].upper()} ({exc})") from None


def read_texts(
    path: str | Path, *, text_field: str = "text", title_field: str | None = None
) -> Iterator[tuple[str, str]]:
    """``(where, passage text)`` for every row of a corpus (see :func:`corpus_files`), file by file, in order.

    The passage is the ``text_field`` alone, unchanged (what the adapters send for the same document); with
    ``title_field`` it is ``passage_text(title, text)``. ``where`` is ``file:line`` (JSON lines) or
    ``file: row N`` (CSV, Parquet), for messages.

    Args:
        path: a corpus file or folder.
        text_field: the field (column) holding the text.
        title_field: a field holding a title to put before the text (a missing or empty title is no title).

    Raises:
        InvalidInputError: a row without the text field, with a text that is not a string or has no non-space
            character, a line that is not JSON, an empty file, or a file that cannot be read; the message names
            the file and line (or row).
    """
    for file in corpus_files(path):
        empty = True
        for where, row in _located_rows(file):
            empty = False
            if text_field not in row:
                raise InvalidInputError(f"{where}: no {text_field!r} field (fields: {sorted(row)[:10]})")
            text = row[text_field]
            if not isinstance(text, str):
                raise InvalidInputError(f"{where}: {text_field!r} must be a string, got {type(text).__name__}")
            if title_field is not None:
                title = row.get(title_field)
                if title is not None and not isinstance(title, str):
                    raise InvalidInputError(f"{where}: {title_field!r} must be a string, got {type(title).__name__}")
                text = passage_text(title, text)
            if not text.strip():
                raise InvalidInputError(f"{where}: empty {text_field!r} (a passage needs a non-space character)")
            yield where, text
        if empty:
            raise InvalidInputError(f"{file}: empty file (no rows)")


# ----- BEIR folders --------------------------------------------------------------------------------


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
        str(r["_id"]): passage_text(r.get("title"), r.get("text")).strip()  # as before: a title-less text stripped too
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

    def scores(self, query: str) -> list[float]:
        """BM25 score of ``query`` against every text, in index order (all 0.0 when every query word is a stop word)."""
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return [0.0] * self.n
        docs, scores = self.model.retrieve(tokens, k=self.n, show_progress=False)
        by_doc = dict(zip(docs[0].tolist(), scores[0].tolist()))
        return [float(by_doc.get(i, 0.0)) for i in range(self.n)]
