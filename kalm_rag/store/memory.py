"""In-memory passage store: a bounded LRU, the default when no store is given.

It holds the same encoded bytes as the persistent stores (:mod:`kalm_rag.store.codec`), so a compact
``storage`` shrinks RAM per passage too; reads decode them without the CRC and finiteness checks (the
bytes never left this process's memory and were checked when written).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence

from kalm_rag.errors import StoreConfigError, StoreError
from kalm_rag.store.base import PassageStore, PooledPassage
from kalm_rag.store.codebooks import codebook_lookup
from kalm_rag.store.codec import CorruptEntryError, decode_entry, encode_entry
from kalm_rag.store.options import parse_bytes

DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: about 400 Nano passages of 1024 tokens at ratio 1 in fp32


class MemoryStore(PassageStore):
    """A thread-safe LRU of encoded passages bounded by their bytes.

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
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._corrupt = 0
        self._lock = threading.Lock()

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[PooledPassage | None]:
        with self._lock:
            blobs = [self._entries.get((namespace, key)) for key in keys]
            for key, blob in zip(keys, blobs):
                if blob is not None:
                    self._entries.move_to_end((namespace, key))
        out: list[PooledPassage | None] = []
        lookup = codebook_lookup(self, namespace)
        for key, blob in zip(keys, blobs):
            entry = None
            if blob is not None:
                try:
                    entry = decode_entry(blob, namespace=namespace, key=key, lookup=lookup, verify=False)
                except CorruptEntryError:  # its codebook was dropped: recompute
                    with self._lock:
                        self._corrupt += 1
                        if self._entries.get((namespace, key)) is blob:
                            self._remove((namespace, key))
            out.append(entry)
        hits = sum(entry is not None for entry in out)
        with self._lock:
            self._hits += hits
            self._misses += len(out) - hits
        return out

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        # all or nothing: a malformed or non-finite entry stores none of the batch
        blobs = {key: encode_entry(namespace, key, entry) for key, entry in entries.items()}
        too_big = 0
        with self._lock:
            for key, blob in blobs.items():
                self._remove((namespace, key))
                if len(blob) > self.max_bytes:
                    too_big += 1
                    continue
                self._entries[(namespace, key)] = blob
                self._bytes += len(blob)
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
            meta = self._process_meta()
            for scope_name in [k for k in meta if namespace is None or k[0] == namespace]:
                del meta[scope_name]

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
                "corrupt": self._corrupt,  # entries whose codebook was dropped
                "bytes_per_passage": self._bytes // max(1, len(self._entries)),
            }

    def _remove(self, full_key: tuple[str, str]) -> bool:
        blob = self._entries.pop(full_key, None)
        if blob is None:
            return False
        self._bytes -= len(blob)
        return True

    def _evict_to_budget(self) -> None:
        while self._bytes > self.max_bytes and self._entries:
            _, blob = self._entries.popitem(last=False)
            self._bytes -= len(blob)
            self._evictions += 1
