"""The passage-store interface: every backend implements ``PassageStore``; the engine uses nothing else.

An entry is addressed by ``(namespace, key)``: the namespace is a model fingerprint (weights identity +
encoder settings), the key is the sha256 of the exact passage text. A value is a ``PooledPassage``: MEP
window means at the store's base ratio plus the real-token count of each window, so that any coarser
ratio that is a multiple of the base ratio can be derived exactly.
"""

from __future__ import annotations

import hashlib
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kalm_rag.store.quantize import Codebook


_META_LOCK = threading.RLock()


def passage_key(text: str) -> str:
    """Content key of a passage: sha256 of its exact UTF-8 text, hex.

    Never raises: a lone surrogate (refused by the engine's input checks, but a key may be asked for before
    them) is hashed as its UTF-8-style bytes (``surrogatepass``); valid text keys are unchanged by that.
    """
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class PooledPassage:
    """A passage's cached encoding at ``ratio``.

    Attributes:
        vectors: window means, shape ``(W, d)``, in the storage dtype.
        counts: real-token count of each window, shape ``(W,)``, int32; every count is > 0.
        ratio: the pooling ratio the windows were made at (the store's base ratio).
        storage: how a store keeps the vectors (``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2``,
            ``res1``; see :mod:`kalm_rag.store.quantize`); ``None`` keeps them exactly in their dtype.
            An entry read back from a store has the storage it was written with and float32 ``vectors``
            for the compact storages.
        codebook: the residual codebook a ``resN`` entry is (or was) encoded with.
        blob: the encoded bytes this entry was read from (so that a memory tier filled from a persistent
            store keeps the same bytes instead of quantising decoded vectors again).
    """

    vectors: torch.Tensor
    counts: torch.Tensor
    ratio: int
    storage: str | None = None
    codebook: Codebook | None = field(default=None, repr=False, compare=False)
    blob: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def num_windows(self) -> int:
        """Number of pooled windows ``W``."""
        return int(self.vectors.shape[0])

    @property
    def num_tokens(self) -> int:
        """Number of real tokens the windows pool."""
        return int(self.counts.sum())

    @property
    def nbytes(self) -> int:
        """Bytes held by the tensors (a memory store charges the encoded size, ``len(encode_entry(...))``)."""
        return self.vectors.numel() * self.vectors.element_size() + self.counts.numel() * self.counts.element_size()


class PassageStore(ABC):
    """A cache of pooled passage encodings, keyed by ``(namespace, sha256(text))``.

    Open one from a URL with :meth:`PassageStore.open`; see :func:`kalm_rag.store.open_store`.
    """

    #: The ``storage`` a reranker opened on this store uses when it is given none (the URL's ``?storage=``).
    storage: str | None = None

    @staticmethod
    def open(url: str | None = None, **options: Any) -> PassageStore:
        """Open a store from a URL (``memory://``, ``sqlite:///path``, ``redis://host:port/db``)."""
        from kalm_rag.store import open_store

        return open_store(url, **options)

    @abstractmethod
    def get_many(self, namespace: str, keys: Sequence[str]) -> list[PooledPassage | None]:
        """Entries for ``keys`` in order; ``None`` where missing (or found corrupt or non-finite, which is then
        dropped and counted in ``stats()["corrupt"]``).
        """

    @abstractmethod
    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        """Insert or replace entries, atomically per entry.

        Raises:
            StoreError: some entries were not written (a full disk, a read-only file, a Redis server that
                is down or full, an entry too large or malformed); never returns normally in that case.
                :class:`~kalm_rag.errors.StoreUnavailableError` when the server cannot be reached.
        """

    @abstractmethod
    def contains_many(self, namespace: str, keys: Sequence[str]) -> list[bool]:
        """Whether each key has an entry (does not count as a hit or a miss)."""

    @abstractmethod
    def delete_many(self, namespace: str, keys: Sequence[str]) -> int:
        """Delete entries; returns how many existed."""

    @abstractmethod
    def clear(self, namespace: str | None = None) -> None:
        """Delete every entry of ``namespace``, or of every namespace when ``None``."""

    @abstractmethod
    def iter_keys(self, namespace: str) -> Iterator[str]:
        """Keys stored under ``namespace``."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """Counters: at least ``entries``, ``bytes``, ``hits``, ``misses`` (and ``corrupt``: values found
        damaged or misplaced, dropped and reported as misses).
        """

    # ----- small records next to the entries: codebooks and the settings that shaped a namespace ------

    def get_meta(self, scope: str, name: str) -> bytes | None:
        """The record ``name`` of ``scope`` (a namespace or a model id), or ``None``.

        The base implementation keeps records in this process only; the persistent backends keep them with
        their entries. Reads of a store that is down return ``None``.
        """
        return self._process_meta().get((scope, name))

    def put_meta_if_absent(self, scope: str, name: str, value: bytes) -> bytes:
        """Write the record unless one exists; return the record that is there now (the first writer wins).

        Raises:
            StoreError: the record cannot be written or read back.
        """
        with _META_LOCK:
            return self._process_meta().setdefault((scope, name), bytes(value))

    def delete_meta(self, scope: str, name: str, value: bytes | None = None) -> None:
        """Delete the record (only if it still holds ``value``, when given: a damaged record is dropped
        without racing a writer that replaced it).
        """
        with _META_LOCK:
            meta = self._process_meta()
            if value is None or meta.get((scope, name)) == value:
                meta.pop((scope, name), None)

    def _process_meta(self) -> dict[tuple[str, str], bytes]:
        meta: dict[tuple[str, str], bytes] | None = self.__dict__.get("_meta_records")
        if meta is None:
            with _META_LOCK:
                meta = self.__dict__.setdefault("_meta_records", {})
        return meta

    def healthy(self) -> bool:
        """Whether the backend is reachable right now (always true for embedded stores)."""
        return True

    def close(self) -> None:  # noqa: B027  (a no-op default on purpose: in-memory stores have nothing to release)
        """Release connections and files (a no-op for in-memory stores)."""

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
