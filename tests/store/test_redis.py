"""Redis store against a real redis-server: outages, restarts, corrupt values, TTL, key layout."""

from __future__ import annotations

import logging
import time

import pytest
import redis

from kalm_rag.errors import StoreError, StoreUnavailableError
from kalm_rag.store import passage_key
from kalm_rag.store.redis import RedisStore
from tests.store.helpers import make_entry, same_entry

pytestmark = pytest.mark.redis

NS = "t5gemma2:abc"


def test_key_layout_is_prefixed_and_escaped(redis_server):
    store = RedisStore(redis_server.url, prefix="team-a")
    key = passage_key("text")
    store.put_many("fam:ns*[x]", {key: make_entry(1)})
    raw = redis.Redis.from_url(redis_server.url)
    assert raw.keys("*") == [f"team-a:fam%3Ans%2A%5Bx%5D:p:{key}".encode()]
    assert list(store.iter_keys("fam:ns*[x]")) == [key]
    assert list(store.iter_keys("fam")) == []
    raw.set("someone-else:key", b"x")  # other users of the server are left alone
    store.clear()
    assert raw.keys("*") == [b"someone-else:key"]
    store.close()


def test_a_stopped_server_gives_misses_and_skipped_writes_then_recovers(redis_server, caplog):
    store = RedisStore(redis_server.url, retry_after=0.0, connect_timeout=0.5)
    store.put_many(NS, {"a": make_entry(1)})
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="kalm_rag.store.redis"):
        assert store.get_many(NS, ["a", "b"]) == [None, None]
        with pytest.raises(StoreUnavailableError, match="unreachable"):  # a write is never silently dropped
            store.put_many(NS, {"b": make_entry(2)})
        assert store.contains_many(NS, ["a"]) == [False]
        assert not store.healthy()
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1  # warned once per outage, not once per call
    stats = store.stats()
    assert stats["entries"] == -1 and stats["errors"] >= 4 and stats["skipped_writes"] == 1  # get, put, contains, stats
    with pytest.raises(StoreError, match="clear on Redis"):
        store.clear(NS)

    redis_server.start()  # same port, empty (no persistence)
    assert store.get_many(NS, ["a"]) == [None]
    store.put_many(NS, {"a": make_entry(1)})
    assert same_entry(store.get_many(NS, ["a"])[0], make_entry(1))
    assert store.healthy() and store.stats()["entries"] == 1
    store.close()


def test_retry_after_skips_the_server_for_a_while_after_a_failure(redis_server):
    store = RedisStore(redis_server.url, retry_after=30.0, connect_timeout=0.5)
    redis_server.stop()
    assert store.get_many(NS, ["a"]) == [None]
    redis_server.start()
    t0 = time.monotonic()
    assert store.get_many(NS, ["a"]) == [None]  # not even tried
    with pytest.raises(StoreUnavailableError, match="skipped"):
        store.put_many(NS, {"a": make_entry(1)})
    assert time.monotonic() - t0 < 0.5
    assert store.stats()["skipped_writes"] == 1
    store._open_until = 0.0  # the interval has passed
    store.put_many(NS, {"a": make_entry(1)})
    assert same_entry(store.get_many(NS, ["a"])[0], make_entry(1))
    store.close()


def test_an_unreachable_server_at_start_is_not_fatal():
    store = RedisStore("redis://127.0.0.1:1/0", connect_timeout=0.2)  # nothing listens on port 1
    assert store.get_many(NS, ["a"]) == [None]
    with pytest.raises(StoreUnavailableError):
        store.put_many(NS, {"a": make_entry(1)})
    assert not store.healthy()
    store.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign namespace"])
def test_a_corrupt_value_is_dropped_counted_and_not_served(redis_server, damage):
    store = RedisStore(redis_server.url)
    store.put_many(NS, {"a": make_entry(1), "b": make_entry(2)})
    raw = redis.Redis.from_url(redis_server.url)
    name = store._entry_key(NS, "a")
    blob = bytearray(raw.get(name))
    if damage == "flip":
        blob[-1] ^= 0x80
    elif damage == "truncate":
        blob = blob[:50]
    else:
        blob = bytearray(raw.get(store._entry_key(NS, "b")))
        store.put_many("other-ns", {"a": make_entry(1)})
        name = store._entry_key("other-ns", "a")
    raw.set(name, bytes(blob))
    ns = "other-ns" if damage == "foreign namespace" else NS
    assert store.get_many(ns, ["a"]) == [None]
    assert store.stats()["corrupt"] == 1
    assert raw.exists(name) == 0  # dropped
    store.close()


def test_ttl_expires_entries(redis_server):
    store = RedisStore(redis_server.url, ttl=0.3)
    store.put_many(NS, {"a": make_entry(1)})
    raw = redis.Redis.from_url(redis_server.url)
    assert 0 < raw.pttl(store._entry_key(NS, "a")) <= 300
    time.sleep(0.45)
    assert store.get_many(NS, ["a"]) == [None]
    store.close()


def test_two_clients_share_entries(redis_server):
    first, second = RedisStore(redis_server.url), RedisStore(redis_server.url)
    first.put_many(NS, {"a": make_entry(1)})
    assert same_entry(second.get_many(NS, ["a"])[0], make_entry(1))
    first.close()
    second.close()


def test_an_error_reply_skips_the_write_and_warns_once(redis_server, caplog):
    store = RedisStore(redis_server.url)
    raw = redis.Redis.from_url(redis_server.url)
    raw.config_set("maxmemory", "1")  # every write now fails with OOM (default policy: noeviction)
    with caplog.at_level(logging.WARNING, logger="kalm_rag.store.redis"):
        for key in ("a", "b"):
            with pytest.raises(StoreError, match="refused put_many") as err:
                store.put_many(NS, {key: make_entry(1)})
            assert not isinstance(err.value, StoreUnavailableError)  # the server is up: no back-off
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    assert store.stats()["skipped_writes"] == 2
    raw.config_set("maxmemory", "0")
    store.put_many(NS, {"a": make_entry(1)})
    assert same_entry(store.get_many(NS, ["a"])[0], make_entry(1))
    store.close()
