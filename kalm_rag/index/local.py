"""``--engine local``: one process (torch uses every core), a progress bar, no Ray."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from kalm_rag.engine import Reranker
from kalm_rag.errors import NotStoredError, StoreError
from kalm_rag.index.corpus import Counts, check_corpus, unique_passages
from kalm_rag.index.report import IndexReport, build_report
from kalm_rag.store.quantize import residual_bits

#: Passages read (and sorted by length) at a time, in encoder batches: similar lengths share a batch (less padding),
#: each batch is its own ``Reranker.encode`` call, written to the store when done (an interruption loses one
#: batch) and shown on the progress bar at once.
CHUNK_BATCHES = 16


def index_local(
    corpus: str | Path,
    load_reranker: Callable[[], Reranker],
    *,
    text_field: str,
    title_field: str | None,
    limit: int | None,
    show_progress_bar: bool,
) -> IndexReport:
    """Index ``corpus`` with one reranker in this process.

    The whole corpus is read and checked first (nothing is written if a row is bad), then read again and
    encoded chunk by chunk with ``Reranker.encode(strict=True)``, which skips the passages already in the store
    before any encoder work. The first chunk the store does not keep stops the run; the report says how many
    passages are missing.

    Args:
        corpus: a corpus file or folder (see :func:`kalm_rag.data.corpus_files`).
        load_reranker: builds the reranker (called after the corpus is checked); closed at the end.
        text_field: the field holding the text.
        title_field: a field holding a title to put before the text, or ``None``.
        limit: read only the first ``limit`` rows.
        show_progress_bar: show a progress bar (on stderr).

    Returns:
        The :class:`IndexReport` (``engine="local"``, ``workers=1``).
    """
    start = time.monotonic()
    counts = check_corpus(corpus, text_field=text_field, title_field=title_field, limit=limit)
    reranker = load_reranker()
    present = encoded = 0
    errors: list[str] = []
    bar = tqdm(
        total=counts.unique, desc="Indexing", unit="passage", disable=not show_progress_bar, dynamic_ncols=True
    )  # per encoder batch, with tqdm's rate and ETA
    try:
        chunks = unique_passages(
            corpus,
            text_field=text_field,
            title_field=title_field,
            limit=limit,
            # the first chunk holds the passages a resN codebook is trained from (Reranker.encode trains it)
            chunk_size=max(reranker.batch_size * CHUNK_BATCHES, reranker.codebook_passages),
            counts=Counts(),
        )
        for chunk in chunks:
            missing = _missing_from_store(reranker, chunk)
            if len(missing) < len(chunk):  # already stored: counted at once
                present += len(chunk) - len(missing)
                bar.update(len(chunk) - len(missing))
            for batch in _encoder_batches(reranker, missing):
                try:
                    report = reranker.encode(batch, strict=True, show_progress_bar=False)
                except NotStoredError as exc:  # the store refused a batch: stop, and say how many are missing
                    present += exc.report.already_present
                    encoded += exc.report.stored
                    errors += exc.report.errors or (str(exc),)
                    break
                present += report.already_present
                encoded += report.stored
                bar.update(len(batch))
            else:
                continue
            break  # a batch was not stored: stop the run
        storage, per_passage = reranker.storage, _bytes_per_passage(reranker)
    finally:
        bar.close()
        reranker.close()
    return build_report(
        read=counts.read,
        unique=counts.unique,
        already_present=present,
        encoded=encoded,
        seconds=time.monotonic() - start,
        engine="local",
        workers=1,
        errors=tuple(errors),
        storage=storage,
        bytes_per_passage=per_passage,
    )


def _missing_from_store(reranker: Reranker, chunk: list[tuple[str, str]]) -> list[str]:
    """The texts of ``chunk`` (``(store key, text)`` pairs) the store does not hold yet (all, if it cannot say)."""
    try:
        present = reranker.store.contains_many(reranker.namespace, [key for key, _ in chunk])
    except StoreError:  # Reranker.encode meets the same error and reports it
        return [text for _, text in chunk]
    return [text for (_, text), found in zip(chunk, present) if not found]


def _length_sorted_batches(texts: list[str], size: int) -> Iterator[list[str]]:
    """Encoder batches of ``size`` texts sorted by length (similar lengths together: less padding)."""
    texts = sorted(texts, key=len)
    for i in range(0, len(texts), size):
        yield texts[i : i + size]


def _encoder_batches(reranker: Reranker, texts: list[str]) -> Iterator[list[str]]:
    """:func:`_length_sorted_batches`, except that while a ``resN`` store has no codebook the first batch holds
    the ``codebook_passages`` passages it is trained from (``Reranker.encode`` trains it on what one call gets).
    """
    if texts and residual_bits(reranker.storage) and reranker.codebook is None:
        head, texts = texts[: reranker.codebook_passages], texts[reranker.codebook_passages :]
        yield head
    yield from _length_sorted_batches(texts, reranker.batch_size)


def _bytes_per_passage(reranker: Reranker) -> int | None:
    """Mean bytes per entry of the whole store (``None`` when it cannot say)."""
    try:
        stats = reranker.store.stats()
    except StoreError:
        return None
    entries, nbytes = stats.get("entries", -1), stats.get("bytes", -1)
    return nbytes // entries if entries > 0 and nbytes >= 0 else None
