"""The corpus side of indexing: every row checked, repeated texts dropped, passages handed on in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kalm_rag.data import read_texts
from kalm_rag.store import passage_key


@dataclass
class Counts:
    """Running counts of a pass over the corpus: rows read and distinct passage texts among them."""

    read: int = 0
    unique: int = 0


def unique_passages(
    corpus: str | Path,
    *,
    text_field: str,
    title_field: str | None,
    limit: int | None,
    chunk_size: int,
    counts: Counts,
) -> Iterator[list[tuple[str, str]]]:
    """Chunks of ``(store key, passage text)``, each text's first occurrence only, in corpus order.

    ``counts`` is filled in as the rows go by. A text met again is dropped here, so that it is neither encoded
    twice nor counted twice. The texts already handed on are remembered by the first 16 bytes of their sha256
    (about 90 bytes of memory per distinct passage; 1 GB for 10 million).

    Raises:
        InvalidInputError: a row or file that cannot be read (from :func:`kalm_rag.data.read_texts`), naming the
            file and line.
    """
    seen: set[bytes] = set()
    chunk: list[tuple[str, str]] = []
    for _, text in read_texts(corpus, text_field=text_field, title_field=title_field):
        if limit is not None and counts.read >= limit:
            break
        counts.read += 1
        key = passage_key(text)
        digest = bytes.fromhex(key[:32])
        if digest in seen:
            continue
        seen.add(digest)
        counts.unique += 1
        chunk.append((key, text))
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_corpus(corpus: str | Path, *, text_field: str, title_field: str | None, limit: int | None) -> Counts:
    """Read every row of the corpus once, before anything is written; the rows read and distinct texts.

    Raises:
        InvalidInputError: the first bad row or file, naming the file and line.
    """
    counts = Counts()
    for _ in unique_passages(
        corpus, text_field=text_field, title_field=title_field, limit=limit, chunk_size=4096, counts=counts
    ):
        pass
    return counts
