"""Passage stores: where pooled passage encodings are cached, keyed by model namespace and text hash.

Backends: :class:`MemoryStore` (bounded LRU, this process), ``SQLiteStore`` (one file, many processes),
``RedisStore`` (one server, many machines) and ``TieredStore`` (a memory tier in front of either).
Pick one with a URL through :func:`open_store` / :meth:`PassageStore.open`. The persistent backends
are imported lazily, so ``import kalm_rag`` never imports ``redis``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from kalm_rag.errors import StoreConfigError
from kalm_rag.store.base import PassageStore, PooledPassage, passage_key
from kalm_rag.store.memory import MemoryStore
from kalm_rag.store.options import check_prefix, check_seconds, did_you_mean, parse_bytes, redact_url

__all__ = [
    "MemoryStore",
    "check_store_url",
    "PassageStore",
    "PooledPassage",
    "open_store",
    "parse_bytes",
    "passage_key",
    "redact_url",
]

Parser = Callable[[object], Any]


def _check_storage(value: object) -> str:
    from kalm_rag.store.quantize import STORAGES

    if not isinstance(value, str) or value not in STORAGES:
        raise StoreConfigError(f"storage must be one of {', '.join(STORAGES)}, got {value!r:.80}")
    return value


#: The options each scheme takes (as URL parameters or keyword arguments), with their checks.
_MEMORY_OPTIONS: dict[str, Parser] = {
    "max_bytes": lambda v: parse_bytes(v, "max_bytes"),
    "storage": _check_storage,
}
_SQLITE_OPTIONS: dict[str, Parser] = {
    "storage": _check_storage,
    "timeout": lambda v: check_seconds(v, "timeout"),
    "memory_tier": lambda v: parse_bytes(v, "memory_tier"),
}
_REDIS_OPTIONS: dict[str, Parser] = {
    "storage": _check_storage,
    "prefix": check_prefix,
    "ttl": lambda v: check_seconds(v, "ttl", allow_none=True),
    "socket_timeout": lambda v: check_seconds(v, "socket_timeout"),
    "connect_timeout": lambda v: check_seconds(v, "connect_timeout"),
    "retry_after": lambda v: check_seconds(v, "retry_after", allow_zero=True),
    "max_retry_after": lambda v: check_seconds(v, "max_retry_after", allow_zero=True),
    "memory_tier": lambda v: parse_bytes(v, "memory_tier"),
}


def open_store(url: str | os.PathLike[str] | None = None, **options: Any) -> PassageStore:
    """Open a passage store from a URL, checking every part of it now (never at first use).

    - ``None`` or ``memory://?max_bytes=2GB``: a bounded in-memory LRU of this process (the default).
    - ``sqlite:///passages.db``: a SQLite file, path relative to the working directory;
      ``sqlite:////abs/path/passages.db`` (what ``f"sqlite:///{abs_path}"`` gives) for an absolute path.
      A ``pathlib.Path`` (or any ``os.PathLike``) is taken as a SQLite file path.
    - ``redis://[user:password@]host:6379/0`` (``rediss://`` for TLS, ``unix:///path/redis.sock?db=0`` for a
      local socket): a Redis server shared by many workers.

    Options, as URL parameters or keyword arguments (the same names, parsed the same way; keywords win):
    memory ``max_bytes``; SQLite ``timeout``; Redis ``prefix``, ``ttl``, ``socket_timeout``,
    ``connect_timeout``, ``retry_after``, ``max_retry_after`` and the connection options listed in
    :class:`~kalm_rag.store.redis.RedisStore` (``db``, ``password``, ``health_check_interval``, ``ssl_*``, ...);
    SQLite and Redis ``memory_tier=256MB`` (a bounded LRU in front of the file or server); every scheme
    ``storage=float32|bfloat16|int8|res4|res2|res1``, how a reranker opened on the store keeps vectors when
    it is not given ``storage=`` itself (``store.storage``; docs/store.md).

    Args:
        url: the store URL or a SQLite file path; ``None`` for the default in-memory store.
        **options: the options above.

    Raises:
        StoreConfigError: an unknown scheme or option, a value out of range, a malformed URL (also a
            ``ValueError``); the message names the part refused (passwords are never shown).

    Example:
        >>> open_store("memory://?max_bytes=64MB").stats()["max_bytes"]
        64000000
    """
    kind, target, opts, tier = _plan(url, options)
    storage = opts.pop("storage", None)
    store: PassageStore
    if kind == "memory":
        store = MemoryStore(**opts)
    elif kind == "sqlite":
        from kalm_rag.store.sqlite import SQLiteStore

        store = _with_tier(SQLiteStore(target, **opts), tier)
    else:
        from kalm_rag.store.redis import RedisStore

        store = _with_tier(RedisStore(target, **opts), tier)
    store.storage = storage
    return store


def check_store_url(url: str | os.PathLike[str] | None, **options: Any) -> None:
    """Check a store URL and options as :func:`open_store` would, without opening anything.

    Nothing is created, connected or imported beyond the URL checks (a Redis URL's connection options are
    checked too, which needs redis-py). The adapters call it when they are built, so that a misspelt
    option fails where the pipeline is configured, not at its first document.

    Raises:
        StoreConfigError: what :func:`open_store` would refuse.
    """
    kind, target, _, _ = _plan(url, options)
    if kind == "redis":
        from kalm_rag.store.redis import parse_redis_url

        parse_redis_url(target)


def _plan(url: str | os.PathLike[str] | None, options: dict[str, Any]) -> tuple[str, str, dict[str, Any], int]:
    """``(kind, path or server URL, checked options, memory tier bytes)`` for ``url``; nothing is opened."""
    if url is None:
        return "memory", "", _checked(options, _MEMORY_OPTIONS, "memory"), 0
    if isinstance(url, os.PathLike):
        path = os.fspath(url)
        if not isinstance(path, str) or not path or "\0" in path:
            raise StoreConfigError(f"a store path must be a non-empty str path, got {path!r:.80}")
        opts = _checked(options, _SQLITE_OPTIONS, "sqlite")
        return "sqlite", path, opts, opts.pop("memory_tier", 0)
    if not isinstance(url, str):
        raise StoreConfigError(f"store must be a store URL, a path or None, got {type(url).__name__}")
    try:
        parsed = urlsplit(url)
        query = parse_qsl(parsed.query, keep_blank_values=True)
    except ValueError as exc:
        raise StoreConfigError(f"malformed store URL {redact_url(url)!r}: {exc}") from None
    scheme = parsed.scheme.lower()
    params = dict(query)  # a repeated parameter: the last one wins
    if scheme == "memory":
        if parsed.netloc or parsed.path.strip("/") or parsed.fragment:
            raise StoreConfigError(
                f"memory:// takes no host or path, got {redact_url(url)!r}; use memory://?max_bytes=2GB"
            )
        return "memory", "", _checked({**params, **options}, _MEMORY_OPTIONS, "memory"), 0
    if scheme == "sqlite":
        path = _sqlite_path(parsed, url)
        opts = _checked({**params, **options}, _SQLITE_OPTIONS, "sqlite")
        return "sqlite", path, opts, opts.pop("memory_tier", 0)
    if scheme in ("redis", "rediss", "unix"):
        extra = sorted(set(options) - set(_REDIS_OPTIONS))
        if extra:  # connection options go in the URL, where RedisStore parses them
            name = extra[0]
            raise StoreConfigError(
                f"unknown keyword option {name!r} for a Redis store{did_you_mean(name, _REDIS_OPTIONS)}; "
                f"keywords: {sorted(_REDIS_OPTIONS)}; connection options (db, password, ssl_*, ...) go in the URL"
            )
        opts = _checked(
            {k: v for k, v in {**params, **options}.items() if k in _REDIS_OPTIONS}, _REDIS_OPTIONS, "redis"
        )
        rest = [(k, v) for k, v in query if k not in _REDIS_OPTIONS]
        base = url.split("#", 1)[0].split("?", 1)[0]
        fragment = f"#{parsed.fragment}" if parsed.fragment else ""  # refused by the Redis URL check
        server_url = base + (f"?{urlencode(rest)}" if rest else "") + fragment
        return "redis", server_url, opts, opts.pop("memory_tier", 0)
    raise StoreConfigError(
        f"unknown store URL scheme {parsed.scheme!r} in {redact_url(url)!r}{_nearest_scheme(scheme)}; "
        "expected memory://, sqlite:///path.db, redis://host:port/db, rediss:// or unix:///path.sock"
    )


#: Every store URL scheme, for the suggestion after a typo.
SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix")


def _nearest_scheme(scheme: str) -> str:
    """``" (did you mean sqlite://?)"`` for the scheme closest to a misspelt one, or ``""``."""
    close = difflib.get_close_matches(scheme, SCHEMES, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}://?)" if close else ""


def _checked(given: dict[str, Any], parsers: dict[str, Parser], scheme: str) -> dict[str, Any]:
    """``given`` with every option parsed by its check; an unknown name is refused with a suggestion."""
    out = {}
    for name, value in given.items():
        if name not in parsers:
            raise StoreConfigError(
                f"unknown parameter {name!r} for a {scheme} store{did_you_mean(name, parsers)}; "
                f"known: {sorted(parsers)}"
            )
        out[name] = parsers[name](value)
    return out


def _sqlite_path(parsed: SplitResult, url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db`` (SQLAlchemy's convention)."""
    if parsed.netloc or not parsed.path.startswith("/") or len(parsed.path) < 2 or parsed.fragment:
        raise StoreConfigError(
            "SQLite store URL must be sqlite:///relative.db or sqlite:////absolute/path.db, "
            f"got {redact_url(url)!r:.200}"
        )
    path = unquote(parsed.path[1:])
    if path == ":memory:" or path.startswith("file:"):
        raise StoreConfigError(
            f"{redact_url(url)!r:.200} is not a database file: SQLite in-memory and URI databases are not supported; "
            "use memory:// for a store in this process"
        )
    if "\0" in path:
        raise StoreConfigError(f"SQLite store path contains a NUL character: {redact_url(url)!r:.200}")
    return path


def _with_tier(store: PassageStore, memory_tier: int) -> PassageStore:
    if memory_tier <= 0:
        return store
    from kalm_rag.store.tiered import TieredStore

    return TieredStore(store, max_bytes=memory_tier)
