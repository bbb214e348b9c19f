"""Picking a backend by URL: schemes, paths, parameters, memory tier, and clear errors."""

from __future__ import annotations

import os

import pytest

from kalm_rag.store import MemoryStore, PassageStore, open_store, parse_bytes
from kalm_rag.store.redis import RedisStore
from kalm_rag.store.sqlite import SQLiteStore
from kalm_rag.store.tiered import TieredStore


def test_memory_is_the_default_and_takes_max_bytes():
    assert isinstance(open_store(), MemoryStore)
    store = PassageStore.open("memory://?max_bytes=2GB")
    assert isinstance(store, MemoryStore) and store.max_bytes == 2 * 10**9


def test_sqlite_absolute_path(tmp_path):
    store = PassageStore.open(f"sqlite:///{tmp_path}/sub/passages.db")  # an absolute path gives four slashes
    assert isinstance(store, SQLiteStore)
    assert store.path == tmp_path / "sub" / "passages.db" and store.path.exists()
    store.close()


def test_sqlite_relative_path_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///rel/passages.db?timeout=5")
    assert store.path == tmp_path / "rel" / "passages.db" and store.timeout == 5.0
    os.chdir("/")  # the store keeps its absolute path
    store.put_many("ns", {})
    assert store.stats()["entries"] == 0
    store.close()


def test_memory_tier_in_front_of_sqlite(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/p.db?memory_tier=256MB")
    assert isinstance(store, TieredStore) and isinstance(store.back, SQLiteStore)
    assert store.front.max_bytes == 256 * 10**6
    assert store.stats()["memory_max_bytes"] == 256 * 10**6
    store.close()


def test_keyword_options_override_url_parameters(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/p.db?timeout=5", timeout=7.5, memory_tier="1MiB")
    assert isinstance(store, TieredStore) and store.back.timeout == 7.5 and store.front.max_bytes == 2**20
    store.close()


def test_redis_url_and_parameters_without_connecting():
    store = open_store("redis://:secret@localhost:6390/2?prefix=team-a&ttl=60&retry_after=0.5&memory_tier=1MB")
    assert isinstance(store, TieredStore) and isinstance(store.back, RedisStore)
    back = store.back
    assert back.prefix == "team-a" and back.ttl == 60 and back.retry_after == 0.5
    assert "secret" not in repr(store)
    kwargs = back._client.connection_pool.connection_kwargs
    assert kwargs["port"] == 6390 and kwargs["db"] == 2
    store.close()


@pytest.mark.parametrize(
    "url, message",
    [
        ("postgres://x/y", "unknown store URL scheme"),
        ("sqlite://host/p.db", "sqlite:///relative.db"),
        ("sqlite://", "sqlite:///relative.db"),
        ("memory://?max_bytes=lots", "max_bytes"),
        ("memory://?colour=red", "unknown parameter"),
        ("sqlite:///p.db?wal=off", "unknown parameter"),
        ("redis://localhost/0?prefix=a*b", "prefix"),
    ],
)
def test_bad_urls_are_refused_with_the_reason(url, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        open_store(url)


@pytest.mark.parametrize("text, value", [("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1000", 1000), (7, 7), ("0", 0)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def test_a_redis_url_without_redis_py_names_the_extra(monkeypatch):
    import sys

    from kalm_rag.errors import KalmError, MissingDependencyError

    monkeypatch.setitem(sys.modules, "redis", None)  # as if redis-py were not installed
    monkeypatch.delitem(sys.modules, "kalm_rag.store.redis", raising=False)
    with pytest.raises(MissingDependencyError, match=r'pip install "kalm-rag\[redis\]"') as err:
        open_store("redis://localhost:6379/0")
    assert isinstance(err.value, KalmError) and isinstance(err.value, ImportError)
