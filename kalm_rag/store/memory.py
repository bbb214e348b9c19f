"""In-memory passage store: a bounded LRU, the default when no store is given."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

from kalm_rag.errors import StoreConfigError, StoreError
from kalm_rag.store.base import PassageStore, PooledPassage
from kalm_rag.store.codec import validate_entry
from kalm_rag.store.options import parse_bytes

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: about 400 Nano passages of 1024 tokens at ratio 1 in fp32


class MemoryStore(PassageStore):
    """A thread-safe LRU of pooled passages bounded by the bytes of its tensors.

    Args:
        max_bytes: the most tensor bytes held (an int or a size such as ``"2GB"``); least recently used
            entries are evicted beyond it. An entry larger than ``max_bytes`` on its own is not kept:
            ``put_many`` keeps the others and then raises :class:`~kalm_rag.errors.StoreError` saying so.

    Raises:
        StoreConfigError: ``max_bytes`` is not a positive size.
    """

    def __init__(self, *, max_bytes: int | str = DEFAULT_MAX_BYTES) -> None:
        size = parse_bytes(max_bytes, "max_bytes")
        if size <= 0:
            raise StoreConfigError(f"max_bytes must be > 0, got {max_bytes!r}")
        self.max_bytes = size
        self._entries: OrderedDict[tuple[str, str], PooledPassage] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[PooledPassage | None]:
        out: list[PooledPassage | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get((namespace, key))
                if entry is None:
                    self._misses += 1
                else:
                    self._hits += 1
                    self._entries.move_to_end((namespace, key))
                out.append(entry)
        return out

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        for entry in entries.values():
            validate_entry(entry)  # all or nothing: a malformed or non-finite entry stores none of the batch
        too_big = 0
        with self._lock:
            for key, entry in entries.items():
                self._remove((namespace, key))
                if entry.nbytes > self.max_bytes:
                    too_big += 1
                    continue
                self._entries[(namespace, key)] = entry
                self._bytes += entry.nbytes
            self._evict_to_budget()
        if too_big:
            raise StoreError(
                f"{too_big} of {len(entries)} entries are larger than the memory store's max_bytes "
                f"({self.max_bytes} bytes) and were not kept"
            )

    def contains_many(self, namespace: str, keys: Sequence[str]) -> list[bool]:
        with self._lock:
            return [(namespace, key) in self._entries for key in keys]

    def delete_many(self, namespace: str, keys: Sequence[str]) -> int:
        with self._lock:
            return sum(self._remove((namespace, key)) for key in keys)

    def clear(self, namespace: str | None = None) -> None:
        with self._lock:
            for full_key in [k for k in self._entries if namespace is None or k[0] == namespace]:
                self._remove(full_key)

    def iter_keys(self, namespace: str) -> Iterator[str]:
        with self._lock:
            keys = [key for ns, key in self._entries if ns == namespace]
        return iter(keys)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self._hits,
                "misses": self._misses,
                "evictions": self._evictions,
                "corrupt": 0,  # entries are kept as tensors, never decoded
            }

    def _remove(self, full_key: tuple[str, str]) -> bool:
        entry = self._entries.pop(full_key, None)
        if entry is None:
            return False
        self._bytes -= entry.nbytes
        return True

    def _evict_to_budget(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= entry.nbytes
            self._evictions += 1
