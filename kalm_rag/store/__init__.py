"""Passage stores: where pooled passage encodings are cached, keyed by model namespace and text hash.

Backends: :class:`MemoryStore` (bounded LRU, this process), ``SQLiteStore`` (one file, many processes),
``RedisStore`` (one server, many machines) and ``TieredStore`` (a memory tier in front of either).
Pick one with a URL through :func:`open_store` / :meth:`PassageStore.open`. The persistent backends
are imported lazily, so ``import kalm_rag`` never imports ``redis``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import ParseResult, parse_qs, unquote, urlencode, urlparse, urlunparse

from kalm_rag.store.base import PassageStore, PooledPassage, passage_key
from kalm_rag.store.memory import MemoryStore

__all__ = [
    "MemoryStore",
    "PassageStore",
    "PooledPassage",
    "open_store",
    "parse_bytes",
    "passage_key",
]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str | int) -> int:
    """Parse a size such as ``2GB``, ``512MiB`` or ``1000000`` into bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGIB")
    unit = s[len(number) :]
    if unit not in _UNITS or not number:
        raise ValueError(f"cannot parse a size from {text!r}; use e.g. 2GB, 512MiB or 1000000")
    return int(float(number) * _UNITS[unit])


def open_store(url: str | None = None, **options: Any) -> PassageStore:
    """Open a passage store from a URL.

    - ``None`` or ``memory://?max_bytes=2GB``: a bounded in-memory LRU of this process (the default).
    - ``sqlite:///passages.db``: a SQLite file, path relative to the working directory;
      ``sqlite:////abs/path/passages.db`` (what ``f"sqlite:///{abs_path}"`` gives) for an absolute path.
    - ``redis://host:6379/0``: a Redis server shared by many workers (``rediss://`` for TLS).

    URL parameters: SQLite ``timeout`` (seconds); Redis ``prefix``, ``ttl``, ``socket_timeout``,
    ``connect_timeout``, ``retry_after`` (other parameters go to redis-py); both ``memory_tier=256MB``
    (a bounded LRU in front of the file or server). Keyword ``options`` override URL parameters.

    Args:
        url: the store URL; ``None`` for the default in-memory store.
        **options: keyword arguments of the backend's constructor, plus ``memory_tier``.

    Raises:
        ValueError: unknown scheme or parameter, or a malformed SQLite URL.

    Example:
        >>> open_store("memory://?max_bytes=64MB").stats()["max_bytes"]
        64000000
    """
    if url is None:
        return MemoryStore(**options)
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
    if parsed.scheme == "memory":
        _take(query, options, {"max_bytes": parse_bytes})
        _refuse_unknown(query, url, ["max_bytes"])
        return MemoryStore(**options)
    if parsed.scheme == "sqlite":
        from kalm_rag.store.sqlite import SQLiteStore

        tier = _take(query, options, {"timeout": float, "memory_tier": parse_bytes}).pop("memory_tier", 0)
        _refuse_unknown(query, url, ["timeout", "memory_tier"])
        return _with_tier(SQLiteStore(_sqlite_path(parsed, url), **options), tier)
    if parsed.scheme in ("redis", "rediss", "unix"):
        from kalm_rag.store.redis import RedisStore

        ours: dict[str, Callable[[str], Any]] = {
            "prefix": str,
            "ttl": float,
            "socket_timeout": float,
            "connect_timeout": float,
            "retry_after": float,
            "memory_tier": parse_bytes,
        }
        tier = _take(query, options, ours).pop("memory_tier", 0)
        rest = urlencode(query)  # redis-py's own parameters (health_check_interval, ssl_*, ...)
        return _with_tier(RedisStore(urlunparse(parsed._replace(query=rest)), **options), tier)
    raise ValueError(
        f"unknown store URL scheme {parsed.scheme!r} in {url!r}; expected memory://, sqlite:/// or redis://"
    )


def _take(query: dict[str, str], options: dict[str, Any], parsers: dict[str, Callable[[str], Any]]) -> dict[str, Any]:
    """Move known URL parameters into ``options`` (parsed; keyword options win); return ``options``."""
    for name, parse in parsers.items():
        if name in query:
            raw = query.pop(name)
            try:
                value = parse(raw)
            except ValueError as exc:
                raise ValueError(f"bad store URL parameter {name}={raw!r}: {exc}") from None
            options.setdefault(name, value)
    if "memory_tier" in options:
        options["memory_tier"] = parse_bytes(options["memory_tier"])
    return options


def _refuse_unknown(query: dict[str, str], url: str, known: list[str]) -> None:
    if query:
        raise ValueError(f"unknown parameter(s) {sorted(query)} in store URL {url!r}; known: {known}")


def _sqlite_path(parsed: ParseResult, url: str) -> str:
    """``sqlite:///rel.db`` -> ``rel.db``; ``sqlite:////abs.db`` -> ``/abs.db`` (SQLAlchemy's convention)."""
    if parsed.netloc or not parsed.path.startswith("/") or len(parsed.path) < 2:
        raise ValueError(f"SQLite store URL must be sqlite:///relative.db or sqlite:////absolute/path.db, got {url!r}")
    return unquote(parsed.path[1:])


def _with_tier(store: PassageStore, memory_tier: int) -> PassageStore:
    if memory_tier <= 0:
        return store
    from kalm_rag.store.tiered import TieredStore

    return TieredStore(store, max_bytes=memory_tier)
