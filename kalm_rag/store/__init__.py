"""Passage stores: where pooled passage encodings are cached, keyed by model namespace and text hash."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from kalm_rag.store.base import PassageStore, PooledPassage, passage_key
from kalm_rag.store.memory import MemoryStore

__all__ = ["MemoryStore", "PassageStore", "PooledPassage", "open_store", "passage_key", "parse_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str | int) -> int:
    """Parse a size such as ``2GB``, ``512MiB`` or ``1000000`` into bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    number = s.rstrip("KMGIB")
    unit = s[len(number):]
    if unit not in _UNITS or not number:
        raise ValueError(f"cannot parse a size from {text!r}; use e.g. 2GB, 512MiB or 1000000")
    return int(float(number) * _UNITS[unit])


def open_store(url: str | None = None, **options: Any) -> PassageStore:
    """Open a passage store from a URL.

    ``None`` or ``memory://`` gives a bounded in-memory LRU (``memory://?max_bytes=2GB``).
    """
    if url is None:
        return MemoryStore(**options)
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if parsed.scheme == "memory":
        if "max_bytes" in query:
            options.setdefault("max_bytes", parse_bytes(query["max_bytes"]))
        return MemoryStore(**options)
    raise ValueError(f"unknown store URL scheme {parsed.scheme!r} in {url!r}; expected memory://")
