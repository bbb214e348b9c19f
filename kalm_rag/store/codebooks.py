"""Codebooks kept in a store: one per namespace, written once (the first writer wins), checked when read.

A codebook lives next to the entries it encodes, as the store record ``codebook`` of the namespace
(:meth:`~kalm_rag.store.PassageStore.put_meta_if_absent`: SQLite ``INSERT OR IGNORE`` then a re-read, Redis
``SET NX``). Two indexers that train at once both publish; the first record wins and both go on with it.
A record that fails its checksum is deleted and reported as absent, so the next writer trains a new one,
and the entries of the lost codebook become misses that are recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kalm_rag.store.base import PassageStore
from kalm_rag.store.quantize import Codebook, CodebookError, CorruptCodebookError, register_codebook

logger = logging.getLogger(__name__)

__all__ = ["CODEBOOK_RECORD", "codebook_lookup", "publish_codebook", "read_codebook"]

CODEBOOK_RECORD = "codebook"


def read_codebook(store: PassageStore, namespace: str) -> Codebook | None:
    """The namespace's codebook, or ``None`` (none yet, the store is down, or the record was damaged and dropped)."""
    blob = store.get_meta(namespace, CODEBOOK_RECORD)
    if blob is None:
        return None
    try:
        book = Codebook.from_bytes(blob)
    except CorruptCodebookError as exc:
        logger.warning("dropping the damaged codebook of %s in %r (%s); it is trained again", namespace, store, exc)
        store.delete_meta(namespace, CODEBOOK_RECORD, blob)
        return None
    return register_codebook(book)


def publish_codebook(store: PassageStore, namespace: str, book: Codebook) -> Codebook:
    """Store ``book`` for ``namespace`` unless it has one; return the namespace's codebook (the winner).

    Raises:
        StoreError: the record cannot be written or read back.
    """
    for _ in range(2):  # a damaged winner is dropped once and the write tried again
        stored = store.put_meta_if_absent(namespace, CODEBOOK_RECORD, book.to_bytes())
        if stored == book.to_bytes():
            return register_codebook(book)
        try:
            return register_codebook(Codebook.from_bytes(stored))
        except CorruptCodebookError as exc:
            logger.warning("dropping the damaged codebook of %s in %r (%s)", namespace, store, exc)
            store.delete_meta(namespace, CODEBOOK_RECORD, stored)
    raise CodebookError(f"could not store a codebook for {namespace} in {store!r}")


def codebook_lookup(store: PassageStore, namespace: str) -> Callable[[bytes], Codebook | None]:
    """A ``lookup`` for :func:`~kalm_rag.store.codec.decode_entry`: the namespace's stored codebook if it has ``id``."""

    def lookup(codebook_id: bytes) -> Codebook | None:
        book = read_codebook(store, namespace)
        return book if book is not None and book.id == codebook_id else None

    return lookup
