"""The passage-store interface: every backend implements ``PassageStore``; the engine uses nothing else.

An entry is addressed by ``(namespace, key)``: the namespace is a model fingerprint (weights identity +
encoder settings), the key is the sha256 of the exact passage text. A value is a ``PooledPassage``: MEP
window means at the store's base ratio plus the real-token count of each window, so that any coarser
ratio that is a multiple of the base ratio can be derived exactly.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch


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
    """

    vectors: torch.Tensor
    counts: torch.Tensor
    ratio: int

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
        """Bytes held by the tensors (the size a memory tier charges for the entry)."""
        return self.vectors.numel() * self.vectors.element_size() + self.counts.numel() * self.counts.element_size()


class PassageStore(ABC):
    """A cache of pooled passage encodings, keyed by ``(namespace, sha256(text))``.

    Open one from a URL with :meth:`PassageStore.open`; see :func:`kalm_rag.store.open_store`.
    """

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

    def healthy(self) -> bool:
        """Whether the backend is reachable right now (always true for embedded stores)."""
        return True

    def close(self) -> None:  # noqa: B027  (a no-op default on purpose: in-memory stores have nothing to release)
        """Release connections and files (a no-op for in-memory stores)."""

    def __enter__(self) -> PassageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
