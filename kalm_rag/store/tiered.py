"""A memory tier in front of a persistent store: hot entries are served without I/O or decoding.

Reads try the in-memory LRU first and fill it from the backend; writes go to both (write-through).
Entries are content-addressed, so a copy in the tier can never be stale; an entry deleted through
another process or machine may still be served from this process's tier until it is evicted.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence

from kalm_rag.errors import StoreError
from kalm_rag.store.base import PassageStore, PooledPassage
from kalm_rag.store.memory import MemoryStore

logger = logging.getLogger(__name__)


class TieredStore(PassageStore):
    """``front`` (a bounded :class:`MemoryStore`) caching reads of ``back`` (SQLite, Redis, ...).

    Args:
        back: the store of record.
        max_bytes: tensor bytes the memory tier may hold.

    ``stats()`` reports the backend's ``entries``/``bytes``/``corrupt``/... with ``hits``/``misses``
    counted over both tiers (a hit in either is a hit), plus ``memory_entries``, ``memory_bytes``,
    ``memory_max_bytes``, ``memory_hits`` and ``memory_evictions``.
    """

    def __init__(self, back: PassageStore, *, max_bytes: int | str) -> None:
        self.back = back
        self.front = MemoryStore(max_bytes=max_bytes)

    def __repr__(self) -> str:
        return f"TieredStore({self.back!r}, max_bytes={self.front.max_bytes})"

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[PooledPassage | None]:
        out = self.front.get_many(namespace, keys)
        missing = [k for k, e in zip(keys, out) if e is None]  # duplicates kept: hits + misses == len(keys)
        if not missing:
            return out
        try:
            back = self.back.get_many(namespace, missing)
        except StoreError as exc:  # keep the front hits: only the misses are recomputed
            logger.warning("the passage store behind the memory tier failed a read (%s); %d misses", exc, len(missing))
            return out
        found = {k: e for k, e in zip(missing, back) if e is not None}
        if found:
            with contextlib.suppress(StoreError):
                self.front.put_many(namespace, found)
        return [e if e is not None else found.get(k) for k, e in zip(keys, out)]

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        # the store of record first: when it fails (raises), the tier does not claim to hold the entries
        self.back.put_many(namespace, entries)
        with contextlib.suppress(StoreError):  # an entry larger than the tier is simply not cached in it
            self.front.put_many(namespace, entries)

    def get_meta(self, scope: str, name: str) -> bytes | None:
        return self.back.get_meta(scope, name)

    def put_meta_if_absent(self, scope: str, name: str, value: bytes) -> bytes:
        return self.back.put_meta_if_absent(scope, name, value)

    def delete_meta(self, scope: str, name: str, value: bytes | None = None) -> None:
        self.back.delete_meta(scope, name, value)

    def contains_many(self, namespace: str, keys: Sequence[str]) -> list[bool]:
        here = self.front.contains_many(namespace, keys)
        rest = [k for k, h in zip(keys, here) if not h]
        there = iter(self.back.contains_many(namespace, rest) if rest else [])
        return [h or next(there) for h in here]

    def delete_many(self, namespace: str, keys: Sequence[str]) -> int:
        self.front.delete_many(namespace, keys)
        return self.back.delete_many(namespace, keys)

    def clear(self, namespace: str | None = None) -> None:
        self.front.clear(namespace)
        self.back.clear(namespace)

    def iter_keys(self, namespace: str) -> Iterator[str]:
        return self.back.iter_keys(namespace)

    def stats(self) -> dict[str, int]:
        front, back = self.front.stats(), self.back.stats()
        out = dict(back)
        # every request reaches the front; only its misses reach the back
        out["hits"] = front["hits"] + back["hits"]
        out["misses"] = back["misses"]
        out.update(
            {
                "memory_entries": front["entries"],
                "memory_bytes": front["bytes"],
                "memory_max_bytes": front["max_bytes"],
                "memory_hits": front["hits"],
                "memory_evictions": front["evictions"],
            }
        )
        return out

    def healthy(self) -> bool:
        return self.back.healthy()

    def close(self) -> None:
        self.back.close()
