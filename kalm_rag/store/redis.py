"""Redis passage store: one cache shared by many workers and machines, through ``redis-py``.

Key layout (namespace and key are percent-encoded, so neither can contain ``:`` or a glob character)::

    {prefix}:{namespace}:p:{key}   -> codec bytes of one entry (a plain string value, optional TTL)

(Versions before 0.2 also kept a hash ``{prefix}:{namespace}:ids`` of caller ids; nothing reads it any more,
and ``clear`` removes it with the namespace.)

``get_many`` is one ``MGET``; ``put_many`` and ``contains_many`` are one pipeline each. ``iter_keys``,
``clear`` and ``stats`` walk the keys with ``SCAN`` (O(entries), meant for maintenance, not the hot path).

The store is a cache, so an unreachable server must not stop scoring: while Redis is down, reads are
misses, writes are skipped, one warning is logged per outage, and calls are not even attempted for
``retry_after`` seconds after a failure. When the server is back the client reconnects by itself.
An error reply (``OOM`` under ``maxmemory`` with ``noeviction``, ``READONLY`` from a replica) is
treated the same way for that call, without the pause, and logged once until a call succeeds.
Maintenance calls (``delete_many``, ``clear``, ``iter_keys``) raise :class:`~kalm_rag.errors.StoreError`
instead, since silently doing nothing there would be a lie.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TypeVar, cast
from urllib.parse import quote, unquote

from kalm_rag.errors import MissingDependencyError, StoreError

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ModuleNotFoundError as exc:  # redis-py is an optional dependency
    raise MissingDependencyError('redis:// passage stores need redis-py: pip install "kalm-rag[redis]"') from exc

from kalm_rag.store.base import PassageStore, PooledPassage
from kalm_rag.store.codec import CorruptEntryError, decode_entry, encode_entry

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"
_SCAN_COUNT = 1000
# One SCAN step counted server-side: returns {next cursor, keys seen, their total value length}, so
# stats() moves no key names over the wire. (It reads keys it does not declare: standalone Redis only.)
_SCAN_SIZES = """
local page = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local n, bytes = 0, 0
for _, k in ipairs(page[2]) do n = n + 1; bytes = bytes + redis.call('STRLEN', k) end
return {page[1], n, bytes}
"""
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


class RedisStore(PassageStore):
    """A passage store in a Redis server.

    Args:
        url: ``redis://[user:password@]host:port/db`` (or ``rediss://`` for TLS, ``unix://`` for a socket).
        prefix: first component of every key (letters, digits, ``_ . -``), to share a server with others.
        ttl: seconds an entry lives after it is written; ``None`` keeps entries until deleted or evicted.
        socket_timeout: seconds to wait for a reply before the server counts as unreachable.
        connect_timeout: seconds to wait for a connection.
        retry_after: seconds to skip Redis after a failure (misses, skipped writes) before trying again.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = "kalm",
        ttl: float | None = None,
        socket_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        retry_after: float = 1.0,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", prefix):
            raise ValueError(f"prefix must be letters, digits, '_', '.' or '-', got {prefix!r}")
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds or None, got {ttl}")
        if retry_after < 0:
            raise ValueError(f"retry_after must be >= 0 seconds, got {retry_after}")
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.retry_after = float(retry_after)
        # one retry on a fresh connection: a server restart between two calls is then invisible
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._scan_sizes = self._client.register_script(_SCAN_SIZES)
        self._lock = threading.Lock()
        self._counters = {"hits": 0, "misses": 0, "corrupt": 0, "errors": 0, "skipped_writes": 0}
        self._down_until = 0.0
        self._down = False
        self._refusals: set[type[Exception]] = set()  # error replies already warned about

    def __repr__(self) -> str:
        return f"RedisStore({_redact(self.url)!r}, prefix={self.prefix!r})"

    # ----- keys ------------------------------------------------------------------------------------

    def _ns(self, namespace: str) -> str:
        return f"{self.prefix}:{quote(namespace, safe='')}"

    def _entry_key(self, namespace: str, key: str) -> str:
        return f"{self._ns(namespace)}:p:{quote(key, safe='')}"

    # ----- outage handling -------------------------------------------------------------------------

    def _degrade(self, action: str, call: Callable[[], T], fallback: T) -> T:
        """Run ``call``; while Redis is unreachable return ``fallback`` instead (warning once per outage)."""
        if time.monotonic() < self._down_until:
            self._count("errors")
            return fallback
        try:
            result = call()
        except _UNAVAILABLE as exc:
            self._count("errors")
            with self._lock:
                self._down_until = time.monotonic() + self.retry_after
                first = not self._down
                self._down = True
            if first:
                logger.warning(
                    "Redis passage store %s is unreachable during %s (%s); scoring goes on without it "
                    "(passages are re-encoded, writes skipped) and retries every %gs",
                    _redact(self.url),
                    action,
                    exc,
                    self.retry_after,
                )
            return fallback
        except redis.RedisError as exc:  # the server answered with an error (out of memory, read-only replica)
            self._count("errors")
            with self._lock:
                first = type(exc) not in self._refusals
                self._refusals.add(type(exc))
            if first:
                logger.warning(
                    "Redis passage store %s refused %s (%s); going on without it", _redact(self.url), action, exc
                )
            return fallback
        if self._down or self._refusals:
            with self._lock:
                was_down, self._down = self._down, False
                self._refusals.clear()
            if was_down:
                logger.warning("Redis passage store %s is reachable again", _redact(self.url))
        return result

    def _strict(self, action: str, call: Callable[[], T]) -> T:
        """Run ``call``; a Redis failure raises :class:`StoreError` naming the action and the server."""
        try:
            return call()
        except redis.RedisError as exc:
            raise StoreError(f"{action} on Redis {_redact(self.url)} failed: {exc}") from exc

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def healthy(self) -> bool:
        """Whether the server answers a ``PING`` now."""
        try:
            return bool(self._client.ping())
        except redis.RedisError:
            return False

    # ----- PassageStore ----------------------------------------------------------------------------

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[PooledPassage | None]:
        if not keys:
            return []
        names = [self._entry_key(namespace, key) for key in keys]
        # a client without decode_responses returns bytes (redis-py types the reply as bytes | str)
        missing: list[bytes | None] = [None] * len(keys)
        blobs = self._degrade("get_many", lambda: cast(list[bytes | None], self._client.mget(names)), missing)
        out: list[PooledPassage | None] = []
        corrupt: list[str] = []
        for key, name, blob in zip(keys, names, blobs):
            entry = None
            if blob is not None:
                try:
                    entry = decode_entry(blob, namespace=namespace, key=key)
                except CorruptEntryError as exc:
                    logger.warning("dropping a corrupt passage entry %s in Redis: %s", name[:80], exc.reason)
                    corrupt.append(name)
            out.append(entry)
        if corrupt:
            self._count("corrupt", len(corrupt))
            # a concurrent rewrite of the same key may be lost here; it is then simply recomputed
            self._degrade("delete corrupt", lambda: self._client.delete(*corrupt), 0)
        hits = sum(entry is not None for entry in out)
        self._count("hits", hits)
        self._count("misses", len(out) - hits)
        return out

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        if not entries:
            return
        blobs = {self._entry_key(namespace, key): encode_entry(namespace, key, entry) for key, entry in entries.items()}

        def write() -> bool:
            pipe = self._client.pipeline(transaction=False)
            for name, blob in blobs.items():
                pipe.set(name, blob, px=None if self.ttl is None else max(1, int(self.ttl * 1000)))
            pipe.execute()
            return True

        if not self._degrade("put_many", write, False):
            self._count("skipped_writes", len(blobs))

    def contains_many(self, namespace: str, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []

        def exists() -> list[bool]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._entry_key(namespace, key))
            return [bool(n) for n in pipe.execute()]

        return self._degrade("contains_many", exists, [False] * len(keys))

    def delete_many(self, namespace: str, keys: Sequence[str]) -> int:
        names = list(dict.fromkeys(self._entry_key(namespace, key) for key in keys))
        if not names:
            return 0
        return int(self._strict("delete_many", lambda: self._client.delete(*names)))

    def clear(self, namespace: str | None = None) -> None:
        pattern = f"{self.prefix}:*" if namespace is None else f"{self._ns(namespace)}:*"

        def unlink_all() -> None:
            batch: list[bytes] = []
            for name in self._client.scan_iter(match=pattern, count=_SCAN_COUNT):
                batch.append(name)
                if len(batch) >= _SCAN_COUNT:
                    self._client.unlink(*batch)
                    batch = []
            if batch:
                self._client.unlink(*batch)

        self._strict("clear", unlink_all)

    def iter_keys(self, namespace: str) -> Iterator[str]:
        """Keys of ``namespace`` (``SCAN`` order; a key written during the walk may or may not appear)."""
        head = f"{self._ns(namespace)}:p:"
        names = self._strict("iter_keys", lambda: list(self._client.scan_iter(match=head + "*", count=_SCAN_COUNT)))
        return iter([unquote(name.decode()[len(head) :]) for name in names])

    def stats(self) -> dict[str, int]:
        """Counters of this process, plus ``entries``/``bytes`` of every namespace under the prefix.

        ``entries`` and ``bytes`` walk the keys (O(entries)); they are -1 while the server is unreachable.
        """

        def sizes() -> tuple[int, int]:
            cursor, entries, nbytes = b"0", 0, 0
            while True:
                cursor, n, size = self._scan_sizes(args=[cursor, f"{self.prefix}:*:p:*", _SCAN_COUNT])
                entries, nbytes = entries + int(n), nbytes + int(size)
                if int(cursor) == 0:
                    return entries, nbytes

        entries, nbytes = self._degrade("stats", sizes, (-1, -1))
        with self._lock:
            counters = dict(self._counters)
        return {"entries": entries, "bytes": nbytes, **counters}

    def close(self) -> None:
        self._client.close()


def _redact(url: str) -> str:
    """``url`` without its password (for logs and errors)."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)
