"""Redis passage store: one cache shared by many workers and machines, through ``redis-py``.

Key layout (namespace and key are percent-encoded, so neither can contain ``:`` or a glob character)::

    {prefix}:{namespace}:p:{key}   -> codec bytes of one entry (a plain string value, optional TTL)
    {prefix}:{scope}:m:{name}      -> a record of a namespace or model id (its codebook, its settings; no TTL),
                                      written with ``SET NX`` so that the first writer wins

(Versions before 0.2 also kept a hash ``{prefix}:{namespace}:ids`` of caller ids; nothing reads it any more,
and ``clear`` removes it with the namespace.)

``get_many`` is one ``MGET``; ``put_many`` and ``contains_many`` are one pipeline each. ``iter_keys``,
``clear`` and ``stats`` walk the keys with ``SCAN`` (O(entries), meant for maintenance, not the hot path).

The store is a cache, so a server that is down, hung or refusing must not stop scoring, nor slow it down:

- timeouts are short (``socket_timeout`` and ``connect_timeout`` 0.5 s), and a timed-out command is not
  retried (a dropped connection is retried once, on a fresh connection, so a server restart between two
  calls is invisible);
- a circuit breaker: after a failure Redis is skipped for ``retry_after`` seconds (doubling after each
  further failure, up to ``max_retry_after``); then one call probes it while the others keep skipping it.
  A call therefore waits for Redis at most about one ``socket_timeout`` (+ ``connect_timeout``), and
  while the breaker is open it does not wait at all;
- while Redis is skipped or failing, reads are misses (the engine recomputes), and writes raise
  :class:`~kalm_rag.errors.StoreUnavailableError` (the engine warns at query time and fails an indexing
  call); one warning is logged per outage and one when the server is back;
- an error reply (``OOM`` under ``maxmemory`` with ``noeviction``, ``READONLY`` from a replica) makes that
  call's reads misses and its writes raise :class:`~kalm_rag.errors.StoreError`, without the pause; its
  warning is logged at most once a minute;
- a wrong password is reported as refused credentials, not as an unreachable server.

Maintenance calls (``delete_many``, ``clear``, ``iter_keys``) always try the server and raise
:class:`~kalm_rag.errors.StoreError` on failure, since silently doing nothing there would be a lie.
Passwords never appear in ``repr``, logs or errors.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from kalm_rag._logs import RateLimitedWarning
from kalm_rag.errors import MissingDependencyError, StoreConfigError, StoreError, StoreUnavailableError

try:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
except ModuleNotFoundError as exc:  # redis-py is an optional dependency
    raise MissingDependencyError('redis:// passage stores need redis-py: pip install "kalm-rag[redis]"') from exc

from kalm_rag.store.base import PassageStore, PooledPassage
from kalm_rag.store.codebooks import codebook_lookup
from kalm_rag.store.codec import CorruptEntryError, decode_entry, encode_entry
from kalm_rag.store.options import (
    check_bool,
    check_count,
    check_prefix,
    check_seconds,
    did_you_mean,
    redact_url,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_URL = "redis://localhost:6379/0"
DEFAULT_SOCKET_TIMEOUT = 0.5
DEFAULT_CONNECT_TIMEOUT = 0.5
DEFAULT_RETRY_AFTER = 1.0
DEFAULT_MAX_RETRY_AFTER = 30.0
_SCAN_COUNT = 1000
# One SCAN step counted server-side: returns {next cursor, keys seen, their total value length}, so
# stats() moves no key names over the wire. (It reads keys it does not declare: standalone Redis only.)
_SCAN_SIZES = """
local page = redis.call('SCAN', ARGV[1], 'MATCH', ARGV[2], 'COUNT', ARGV[3])
local n, bytes = 0, 0
for _, k in ipairs(page[2]) do n = n + 1; bytes = bytes + redis.call('STRLEN', k) end
return {page[1], n, bytes}
"""
_CREDENTIALS = (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError)


def _text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise StoreConfigError(f"{name} must be a non-empty string")
    return value


def _cert_reqs(value: object) -> str:
    if value not in ("none", "optional", "required"):
        raise StoreConfigError(f"ssl_cert_reqs must be none, optional or required, got {value!r:.40}")
    return str(value)


#: Connection options a Redis URL may carry (``?name=value``), passed to redis-py after these checks.
CONNECTION_OPTIONS: dict[str, Callable[[object], Any]] = {
    "db": lambda v: check_count(v, "db"),
    "username": lambda v: _text(v, "username"),
    "password": lambda v: _text(v, "password"),
    "health_check_interval": lambda v: check_count(v, "health_check_interval"),
    "max_connections": lambda v: check_count(v, "max_connections", minimum=1),
    "socket_keepalive": lambda v: check_bool(v, "socket_keepalive"),
    "client_name": lambda v: _text(v, "client_name"),
    "ssl_cert_reqs": _cert_reqs,
    "ssl_ca_certs": lambda v: _text(v, "ssl_ca_certs"),
    "ssl_certfile": lambda v: _text(v, "ssl_certfile"),
    "ssl_keyfile": lambda v: _text(v, "ssl_keyfile"),
    "ssl_check_hostname": lambda v: check_bool(v, "ssl_check_hostname"),
}
_OWN_OPTIONS = ("prefix", "ttl", "socket_timeout", "connect_timeout", "retry_after", "max_retry_after", "memory_tier")


def parse_redis_url(url: str) -> dict[str, Any]:
    """The ``redis.Redis`` keyword arguments of ``url``, every part checked (nothing is connected).

    ``redis://[[user]:password@]host[:port][/db]``, ``rediss://...`` (TLS) or ``unix://[[user]:password@]/path``;
    ``db`` may also be a URL parameter, and so may ``username``/``password`` and the options of
    :data:`CONNECTION_OPTIONS` (``ssl_*`` with ``rediss://`` only).

    Raises:
        StoreConfigError: anything malformed or unknown (an unknown parameter names the closest known one).
    """
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
        params = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError as exc:
        raise StoreConfigError(f"malformed Redis URL {shown!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise StoreConfigError(f"a Redis URL starts with redis://, rediss:// or unix://, got {shown!r}")
    if parts.fragment:
        raise StoreConfigError(f"a Redis URL has no #fragment: {shown!r}")
    kwargs: dict[str, Any] = {}
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        if user:
            kwargs["username"] = unquote(user)
        if colon and password:
            kwargs["password"] = unquote(password)
    for name, value in params:
        if name not in CONNECTION_OPTIONS:
            hint = did_you_mean(name, [*CONNECTION_OPTIONS, *_OWN_OPTIONS])
            raise StoreConfigError(
                f"unknown Redis URL parameter {name!r}{hint} in {shown!r}; "
                f"known: {sorted([*CONNECTION_OPTIONS, *_OWN_OPTIONS])}"
            )
        if name in kwargs:
            raise StoreConfigError(f"Redis URL parameter {name!r} is given twice in {shown!r}")
        if name.startswith("ssl_") and scheme != "rediss":
            raise StoreConfigError(f"{name} needs a rediss:// (TLS) URL, got {shown!r}")
        kwargs[name] = CONNECTION_OPTIONS[name](value)
    if scheme == "unix":
        if hostport or port:
            raise StoreConfigError(
                f"a unix:// URL names a socket path, not a host: unix:///path/redis.sock, got {shown!r}"
            )
        path = unquote(parts.path)
        if not path or path == "/" or "\0" in path:
            raise StoreConfigError(f"a unix:// URL needs the socket's path: unix:///path/redis.sock, got {shown!r}")
        kwargs["unix_socket_path"] = path
        return kwargs
    kwargs["host"] = parts.hostname or "localhost"
    kwargs["port"] = 6379 if port is None else port
    if port == 0:
        raise StoreConfigError(f"Redis port must be 1..65535, got 0 in {shown!r}")
    db_path = unquote(parts.path).strip("/")
    if db_path:
        if not db_path.isascii() or not db_path.isdigit():
            raise StoreConfigError(
                f"the path of a Redis URL is the database number (/0, /1, ...), got /{db_path!r:.40}"
            )
        if "db" in kwargs:
            raise StoreConfigError(f"the database is given twice (path and ?db=) in {shown!r}")
        kwargs["db"] = check_count(db_path, "db")
    if scheme == "rediss":
        kwargs["ssl"] = True
    return kwargs


class RedisStore(PassageStore):
    """A passage store in a Redis server.

    Args:
        url: ``redis://[user:password@]host:port/db`` (or ``rediss://`` for TLS, ``unix:///path/redis.sock?db=0``
            for a local socket), with optional connection parameters (see :func:`parse_redis_url`).
        prefix: first component of every key (letters, digits, ``_ . -``), to share a server with others.
        ttl: seconds an entry lives after it is written; ``None`` keeps entries until deleted or evicted.
        socket_timeout: seconds to wait for a reply before the server counts as failing (not retried).
        connect_timeout: seconds to wait for a connection.
        retry_after: seconds to skip Redis after a failure (misses, refused writes) before probing it again.
        max_retry_after: the longest skip: each failed probe doubles the skip up to this.

    Raises:
        StoreConfigError: a malformed URL, an unknown parameter or a value out of range.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        prefix: str = "kalm",
        ttl: float | None = None,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
    ) -> None:
        if not isinstance(url, str):
            raise StoreConfigError(f"url must be a str, got {type(url).__name__}")
        self.prefix = check_prefix(prefix)
        self.ttl = check_seconds(ttl, "ttl", allow_none=True)
        self.socket_timeout = cast(float, check_seconds(socket_timeout, "socket_timeout"))
        self.connect_timeout = cast(float, check_seconds(connect_timeout, "connect_timeout"))
        self.retry_after = cast(float, check_seconds(retry_after, "retry_after", allow_zero=True))
        self.max_retry_after = cast(float, check_seconds(max_retry_after, "max_retry_after", allow_zero=True))
        if self.max_retry_after < self.retry_after:
            raise StoreConfigError(f"max_retry_after ({max_retry_after}) must be >= retry_after ({retry_after})")
        #: The server's URL with any password masked (safe to log).
        self.url = redact_url(url)
        kwargs = parse_redis_url(url)
        try:
            # retried once on a dropped connection (a restart between two calls), never on a timeout (a hung server)
            self._client = redis.Redis(
                **kwargs,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=self.connect_timeout,
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
            )
        except (TypeError, ValueError, redis.RedisError) as exc:
            raise StoreConfigError(f"cannot configure a Redis client for {self.url!r}: {exc}") from None
        self._scan_sizes = self._client.register_script(_SCAN_SIZES)
        self._lock = threading.Lock()
        self._counters = {"hits": 0, "misses": 0, "corrupt": 0, "errors": 0, "skipped_writes": 0}
        self._failures = 0  # consecutive failed attempts (0: the breaker is closed)
        self._open_until = 0.0  # monotonic time before which Redis is not tried
        self._probing = False  # one call is trying Redis after a skip; the others keep skipping it
        self._last_failure = ""
        self._warnings = RateLimitedWarning(logger)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}, prefix={self.prefix!r})"

    # ----- keys ------------------------------------------------------------------------------------

    def _ns(self, namespace: str) -> str:
        return f"{self.prefix}:{quote(namespace, safe='')}"

    def _entry_key(self, namespace: str, key: str) -> str:
        return f"{self._ns(namespace)}:p:{quote(key, safe='')}"

    # ----- failures: the circuit breaker ------------------------------------------------------------

    def _attempt(self, action: str, call: Callable[[], T]) -> T:
        """Run ``call`` through the circuit breaker.

        Raises:
            StoreUnavailableError: Redis is being skipped, or failed now (unreachable, hung, refused credentials).
            StoreError: the server answered with an error (out of memory, read-only replica).
        """
        with self._lock:
            now = time.monotonic()
            if self._failures and (now < self._open_until or self._probing):
                self._counters["errors"] += 1
                wait = max(0.0, self._open_until - now)
                raise StoreUnavailableError(
                    f"Redis passage store {self.url} is skipped for {wait:.1f}s more after a failure "
                    f"({self._last_failure})"
                )
            probing = self._probing = bool(self._failures)
        try:
            result = call()
        except _CREDENTIALS as exc:
            raise self._trip(action, f"refused the credentials (wrong user name or password?): {exc}") from exc
        except redis.TimeoutError as exc:
            raise self._trip(action, f"did not answer within {self.socket_timeout:g}s: {exc}") from exc
        except redis.ConnectionError as exc:
            raise self._trip(action, f"is unreachable: {exc}") from exc
        except redis.RedisError as exc:  # the server answered with an error: it is up, so the breaker closes
            self._close_breaker()
            self._count("errors")
            reply = _reply(exc)
            self._warnings.warn(
                f"refused:{type(exc).__name__}",
                "Redis passage store %s refused %s (%s); going on without it",
                self.url,
                action,
                reply,
            )
            raise StoreError(f"Redis passage store {self.url} refused {action}: {reply}") from exc
        finally:
            if probing:
                with self._lock:
                    self._probing = False
        self._close_breaker()
        return result

    def _trip(self, action: str, what: str) -> StoreUnavailableError:
        """Open the breaker after a failure (longer after each consecutive one); the error to raise."""
        with self._lock:
            self._counters["errors"] += 1
            self._failures += 1
            first = self._failures == 1
            pause = min(self.retry_after * 2 ** (self._failures - 1), self.max_retry_after)
            self._open_until = time.monotonic() + pause
            self._last_failure = what
        if first:
            logger.warning(
                "Redis passage store %s %s (during %s); scoring goes on without it (passages are re-encoded, "
                "writes fail) and it is tried again in %gs, then less often while it keeps failing",
                self.url,
                what,
                action,
                pause,
            )
        return StoreUnavailableError(f"Redis passage store {self.url} {what}")

    def _close_breaker(self) -> None:
        if not self._failures:  # the usual case: no lock taken
            return
        with self._lock:
            was_failing, self._failures = self._failures, 0
            self._open_until = 0.0
        if was_failing:
            logger.warning("Redis passage store %s is reachable again", self.url)

    def _degrade(self, action: str, call: Callable[[], T], fallback: T) -> T:
        """``call`` through the breaker; ``fallback`` when Redis is skipped or fails (for reads)."""
        try:
            return self._attempt(action, call)
        except StoreError:
            return fallback

    def _strict(self, action: str, call: Callable[[], T]) -> T:
        """Run ``call`` now (maintenance: never skipped); a failure raises :class:`StoreError` naming the action."""
        try:
            return call()
        except _CREDENTIALS as exc:
            raise StoreUnavailableError(f"{action} on Redis {self.url}: the server refused the credentials") from exc
        except _UNAVAILABLE as exc:
            raise StoreUnavailableError(f"{action} on Redis {self.url} failed: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"{action} on Redis {self.url} failed: {exc}") from exc

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    def healthy(self) -> bool:
        """Whether the server answers a ``PING`` now (waits at most about ``socket_timeout``)."""
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
        lookup = codebook_lookup(self, namespace)
        for key, name, blob in zip(keys, names, blobs):
            entry = None
            if blob is not None:
                try:
                    entry = decode_entry(blob, namespace=namespace, key=key, lookup=lookup)
                except CorruptEntryError as exc:
                    self._warnings.warn(
                        "corrupt", "dropping a corrupt passage entry %s in Redis: %s", name[:80], exc.reason
                    )
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

        def write() -> None:
            pipe = self._client.pipeline(transaction=False)
            for name, blob in blobs.items():
                pipe.set(name, blob, px=None if self.ttl is None else max(1, int(self.ttl * 1000)))
            pipe.execute()

        try:
            self._attempt("put_many", write)
        except StoreError:
            self._count("skipped_writes", len(blobs))
            raise

    def _meta_key(self, scope: str, name: str) -> str:
        return f"{self._ns(scope)}:m:{quote(name, safe='')}"

    def get_meta(self, scope: str, name: str) -> bytes | None:
        value = self._degrade("get_meta", lambda: self._client.get(self._meta_key(scope, name)), None)
        return None if value is None else bytes(cast(bytes, value))

    def put_meta_if_absent(self, scope: str, name: str, value: bytes) -> bytes:
        record = self._meta_key(scope, name)

        def set_nx_and_read() -> bytes | None:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(record, value, nx=True)
            pipe.get(record)
            return cast("bytes | None", pipe.execute()[1])

        stored = self._attempt("put_meta", set_nx_and_read)
        if stored is None:  # deleted between the two commands: only possible in a MULTI-less proxy
            raise StoreError(f"Redis passage store {self.url} lost the record {name!r} of {scope}")
        return bytes(stored)

    def delete_meta(self, scope: str, name: str, value: bytes | None = None) -> None:
        record = self._meta_key(scope, name)

        def delete() -> None:
            if value is None or self._client.get(record) == value:
                self._client.delete(record)

        self._degrade("delete_meta", delete, None)

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
        ``errors`` counts calls that failed or were skipped, ``skipped_writes`` the entries not written.
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
        per_passage = nbytes // entries if entries > 0 else 0
        return {"entries": entries, "bytes": nbytes, "bytes_per_passage": per_passage, **counters}

    def close(self) -> None:
        self._client.close()


def _reply(exc: Exception) -> str:
    """The server's error reply, without the failed command (a pipeline error quotes it, value bytes included)."""
    text = str(exc)
    _, sep, reply = text.partition(" of pipeline caused error: ")
    return reply if sep else text
