"""Store fault tests of issue #15: poisoned entries (4), a hung Redis (6), secrets (7), one error family (9),
URLs checked when opened (10), readers that never wait for writers (11), warnings that do not repeat (14).
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import struct
import subprocess
import threading
import time

import pytest
import redis
import torch

from kalm_rag import InvalidInputError, KalmError, NotStoredError, Reranker, StoreError
from kalm_rag.errors import StoreConfigError, StoreUnavailableError
from kalm_rag.store import MemoryStore, PooledPassage, codec, open_store, passage_key, redact_url
from kalm_rag.store.codec import HEADER_SIZE, CorruptEntryError, decode_entry, encode_entry
from kalm_rag.store.redis import RedisStore
from kalm_rag.store.sqlite import SQLiteStore
from kalm_rag.store.tiered import TieredStore
from tests.store.conftest import REDIS_SERVER
from tests.store.helpers import full_sqlite, make_entry, same_entry

NS = "t5gemma2:faults"
QUERY = "What is the capital of France?"
PASSAGES = ["Paris is the capital of France.", "Bananas are yellow.", "The Seine flows through Paris. " * 3]


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    return Reranker.from_pretrained(tiny_checkpoint).backend


def poisoned(blob: bytes) -> bytes:
    """``blob`` with its first float32 value set to NaN and the checksum recomputed: it passes every old check."""
    payload = bytearray(blob[HEADER_SIZE:])
    payload[0:4] = struct.pack("<f", float("nan"))
    prefix = blob[: HEADER_SIZE - 4]
    return prefix + codec._checksum(prefix, bytes(payload)) + bytes(payload)


# ----- item 4: poisoned entries ---------------------------------------------------------------------


def test_a_non_finite_value_with_a_valid_checksum_is_refused_on_read():
    blob = poisoned(encode_entry(NS, "k", make_entry(1)))
    with pytest.raises(CorruptEntryError, match="NaN or infinite"):
        decode_entry(blob, namespace=NS, key="k")


@pytest.mark.parametrize("store", [MemoryStore(), "sqlite"], ids=["memory", "sqlite"])
def test_a_non_finite_entry_is_never_written(store, tmp_path):
    store = SQLiteStore(tmp_path / "p.db") if store == "sqlite" else store
    bad = PooledPassage(torch.tensor([[1.0, float("inf")]]), torch.tensor([1], dtype=torch.int32), 1)
    with pytest.raises(StoreError, match="NaN or infinite"):
        store.put_many(NS, {"good": make_entry(1), "bad": bad})
    assert store.contains_many(NS, ["good", "bad"]) == [False, False]  # nothing of the batch
    store.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_poisoned_entry_is_dropped_counted_and_recomputed(backend, tmp_path, request, kind):
    url = f"sqlite:///{tmp_path}/p.db" if kind == "sqlite" else request.getfixturevalue("redis_server").url
    rr = Reranker(backend, store=url)
    before = rr.score(QUERY, PASSAGES, return_margin=True)
    key = passage_key(PASSAGES[2])
    if kind == "sqlite":
        (blob,) = rr.store._conn().execute("SELECT value FROM passages WHERE key = ?", (key,)).fetchone()
        with rr.store._write() as conn:
            conn.execute("UPDATE passages SET value = ? WHERE key = ?", (poisoned(blob), key))
    else:
        name = rr.store._entry_key(rr.namespace, key)
        rr.store._client.set(name, poisoned(rr.store._client.get(name)))
    encoded = rr.counters["encoded_passages"]
    # before: NumericalError ("the model overflows") on this and every later call
    assert rr.score(QUERY, PASSAGES, return_margin=True) == pytest.approx(before, abs=1e-5)
    assert rr.counters["encoded_passages"] == encoded + 1
    assert rr.store.stats()["corrupt"] == 1
    assert rr.score(QUERY, PASSAGES, return_margin=True) == pytest.approx(before, abs=1e-5)  # stored again, clean
    assert rr.counters["encoded_passages"] == encoded + 1
    rr.close()


# ----- item 6: a hung Redis ---------------------------------------------------------------------------


@pytest.mark.redis
def test_a_hung_redis_adds_a_bounded_wait_per_call_and_scoring_goes_on(backend, redis_server, monkeypatch):
    # default timeouts (the point of the test); a short longest back-off so that recovery is quick to see
    rr = Reranker(backend, store=f"{redis_server.url}?max_retry_after=1")
    baseline = rr.score(QUERY, PASSAGES, return_margin=True)
    waited: list[float] = []  # seconds spent in the store (the model's own time varies with the machine's load)
    for name in ("get_many", "put_many", "contains_many"):
        real = getattr(rr.store, name)

        def timed(*args, _real=real, **kwargs):
            start = time.monotonic()
            try:
                return _real(*args, **kwargs)
            finally:
                waited.append(time.monotonic() - start)

        monkeypatch.setattr(rr.store, name, timed)
    pid = redis_server.process.pid
    os.kill(pid, signal.SIGSTOP)  # stopped, not crashed: connections are accepted and never answered
    try:
        per_call = []
        for _ in range(5):
            waited.clear()
            assert rr.score(QUERY, PASSAGES, return_margin=True) == pytest.approx(baseline, abs=1e-5)
            per_call.append(sum(waited))
        assert sum(per_call) < 4.0, per_call  # before: 10 s (2 x 5 s socket timeout) in each call
        assert max(per_call) < 1.5, per_call
        waited.clear()
        with pytest.raises(NotStoredError, match="1 of 1 passages were not stored"):
            rr.encode(["A passage to index while Redis hangs."])
        assert sum(waited) < 1.5, waited
    finally:
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.1)  # the longest back-off: the next call probes the server again
    hits = rr.store.stats()["hits"]
    assert rr.score(QUERY, PASSAGES, return_margin=True) == pytest.approx(baseline, abs=1e-5)
    assert rr.store.stats()["hits"] == hits + len(PASSAGES)  # the cache is used again
    rr.close()


@pytest.mark.redis
def test_only_one_call_at_a_time_probes_a_failing_server(redis_server):
    store = RedisStore(redis_server.url, socket_timeout=0.3, retry_after=0.0)
    store.put_many(NS, {"a": make_entry(1)})
    os.kill(redis_server.process.pid, signal.SIGSTOP)
    try:
        store.get_many(NS, ["a"])  # fails: the breaker opens (for 0 s: every call may probe...)
        times: list[float] = []

        def call() -> None:
            start = time.monotonic()
            store.get_many(NS, ["a"])
            times.append(time.monotonic() - start)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(times)[4] < 0.2, times  # ... but one at a time: the others do not wait
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    store.close()


# ----- item 7: secrets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://:p@ss@host:6379/0", "redis://:***@host:6379/0"),
        ("redis://user:secret@host/1", "redis://user:***@host/1"),
        ("redis://host/0?password=secret&db=1", "redis://host/0?password=***&db=1"),
        ("rediss://token@host", "rediss://***@host"),
        ("unix://:pw@/run/redis.sock?db=2", "unix://:***@/run/redis.sock?db=2"),
        ("sqlite:///p.db", "sqlite:///p.db"),
    ],
)
def test_passwords_are_masked(url, shown):
    assert redact_url(url) == shown


def test_no_password_in_repr_or_errors():
    url = "redis://:p@ss@localhost:6390/0?password=s3cret&prefix=x"
    with pytest.raises(StoreConfigError, match="given twice") as err:  # password in user info and query
        open_store(url)
    assert "p@ss" not in str(err.value) and "ss@" not in str(err.value) and "s3cret" not in str(err.value)
    store = open_store("redis://:p@ss@localhost:6390/0")
    assert "p@ss" not in repr(store) and "ss@" not in repr(store)
    assert store._client.connection_pool.connection_kwargs["password"] == "p@ss"  # the whole password is used
    store.close()
    with pytest.raises(StoreConfigError) as err:
        open_store("redis://localhost/0?password=s3cret&socket_timout=2")
    assert "s3cret" not in str(err.value)


@pytest.mark.redis
def test_a_wrong_password_is_reported_as_refused_credentials(redis_server, caplog):
    redis.Redis.from_url(redis_server.url).config_set("requirepass", "right")
    url = redis_server.url.replace("redis://", "redis://:wr%40ng@")
    store = RedisStore(url)
    with caplog.at_level(logging.WARNING, logger="kalm_rag.store.redis"):
        assert store.get_many(NS, ["a"]) == [None]
        with pytest.raises(StoreUnavailableError, match="refused the credentials"):
            store.put_many(NS, {"a": make_entry(1)})
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "refused the credentials" in logged and "unreachable" not in logged  # before: "unreachable"
    assert "wr@ng" not in logged and "wr%40ng" not in logged and "wr@ng" not in repr(store)
    store.close()


@pytest.mark.redis
def test_an_outage_warning_shows_no_password(redis_server, caplog):
    store = RedisStore(redis_server.url + "?password=s3cret", connect_timeout=0.2)
    redis_server.stop()
    with caplog.at_level(logging.WARNING, logger="kalm_rag.store.redis"):
        store.get_many(NS, ["a"])
    assert caplog.records and all("s3cret" not in r.getMessage() for r in caplog.records)
    store.close()


# ----- item 9: one error family; item 10: every part of a URL checked when the store is opened ------------


@pytest.mark.parametrize(
    "url, message",
    [
        ("redis://localhost/0?socket_timout=2", "did you mean 'socket_timeout'"),
        ("redis://localhost/0?helth_check_interval=2", "did you mean 'health_check_interval'"),
        ("redis://localhost/abc", "database number"),
        ("redis://localhost/0?db=1", "given twice"),
        ("redis://localhost:99999/0", "Port out of range"),
        ("redis://localhost/0?ssl_cert_reqs=none", "needs a rediss://"),
        ("redis://localhost/0?socket_timeout=0", "socket_timeout must be > 0"),
        ("redis://localhost/0?ttl=-1", "ttl must be"),
        ("redis://localhost/0?retry_after=5&max_retry_after=1", "max_retry_after"),
        ("unix://localhost/run/redis.sock", "socket path, not a host"),
        ("unix://", "socket's path"),
        ("sqlite:///p.db?timeout=inf", "finite number of seconds"),
        ("sqlite:///p.db?timeout=nan", "finite number of seconds"),
        ("sqlite:///p.db?timeout=3e6", r"<= 1e\+06 seconds"),
        ("sqlite:///p.db?timeout=-1", "timeout must be > 0"),
        ("sqlite:///p.db?memory_tier=-5", "memory_tier"),
        ("sqlite:///:memory:", "in-memory and URI databases are not supported"),
        ("sqlite:///p.db?wal=off", "unknown parameter 'wal'"),
        ("memory://?max_bytes=inf", "cannot parse max_bytes"),
        ("memory://?max_bytes=1e400", "too large"),
        ("memory://?max_bytes=0", "max_bytes must be > 0"),
        ("memory://host/path", "takes no host or path"),
        ("memory://?max_byte=1GB", "did you mean 'max_bytes'"),
        ("postgres://x/y", "unknown store URL scheme"),
        ("redis://[::1/0", "malformed"),
    ],
)
def test_a_bad_url_is_refused_when_opened_with_a_kalm_error(url, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreConfigError, match=message) as err:
        open_store(url)
    assert isinstance(err.value, KalmError) and isinstance(err.value, ValueError)
    assert isinstance(err.value, InvalidInputError) and isinstance(err.value, StoreError)
    assert list(tmp_path.iterdir()) == []  # nothing created (before: a file named ':memory:')


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_bytes": "lots"}, "max_bytes"),
        ({"max_bytes": True}, "max_bytes"),
        ({"max_bytes": float("inf")}, "max_bytes"),
        ({"colour": "red"}, "unknown parameter 'colour'"),
    ],
)
def test_keyword_options_are_checked_like_url_parameters(options, message):
    with pytest.raises(StoreConfigError, match=message):
        open_store("memory://", **options)


def test_keyword_options_are_parsed_like_url_parameters(tmp_path):
    assert open_store("memory://", max_bytes="2MB").max_bytes == 2 * 10**6  # before: TypeError later
    store = open_store(f"sqlite:///{tmp_path}/p.db", timeout="2.5", memory_tier="1MiB")
    assert isinstance(store, TieredStore) and store.back.timeout == 2.5 and store.front.max_bytes == 2**20
    store.close()
    with pytest.raises(StoreConfigError, match="timeout"):
        open_store(f"sqlite:///{tmp_path}/p.db", timeout="soon")
    with pytest.raises(StoreConfigError, match="did you mean 'socket_timeout'"):
        open_store("redis://localhost/0", socket_timout=1)


def test_a_path_opens_a_sqlite_store(tmp_path):
    store = open_store(tmp_path / "p.db")  # before: AttributeError
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "p.db"
    store.close()


def test_the_backends_refuse_bad_options_themselves(tmp_path):
    for make in (
        lambda: MemoryStore(max_bytes=-5),
        lambda: SQLiteStore(tmp_path / "p.db", timeout=float("inf")),
        lambda: SQLiteStore(":memory:"),
        lambda: RedisStore("redis://localhost/0", prefix="a*b"),
        lambda: RedisStore("redis://localhost/0", ttl=float("nan")),
        lambda: RedisStore("http://localhost/0"),
    ):
        with pytest.raises(StoreConfigError):
            make()


def test_the_adapters_store_option_raises_kalm_errors():
    from kalm_rag.adapters import RerankerHandle, shared_store

    with pytest.raises(KalmError, match="unknown store URL scheme"):
        shared_store("postgres://x")
    with pytest.raises(InvalidInputError, match="store must be"):
        shared_store(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="store must be"):
        RerankerHandle(store=3.5)  # type: ignore[arg-type]


@pytest.fixture
def unix_redis(tmp_path):
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not found on PATH")
    sock = tmp_path / "redis.sock"
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--daemonize", "no", "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)
        yield sock
    finally:
        process.kill()  # by PID, this test's own server
        process.wait(timeout=10)


@pytest.mark.redis
def test_a_unix_socket_url_works(unix_redis):
    store = open_store(f"unix://{unix_redis}?db=1&prefix=sock")  # before: TypeError on the first call
    store.put_many(NS, {"a": make_entry(1)})
    assert same_entry(store.get_many(NS, ["a"])[0], make_entry(1))
    assert store.healthy() and store.stats()["entries"] == 1
    store.close()


# ----- item 11: readers never wait for writers --------------------------------------------------------------


def test_opening_and_reading_a_sqlite_store_never_waits_for_a_writer(tmp_path):
    path = tmp_path / "p.db"
    first = SQLiteStore(path)
    first.put_many(NS, {"a": make_entry(1)})
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock (a long indexing batch)
    writer.execute("DELETE FROM passages WHERE key = 'nothing'")
    try:
        start = time.monotonic()
        reader = SQLiteStore(path, timeout=1.0)  # before: StoreTimeoutError after 1 s
        assert same_entry(reader.get_many(NS, ["a"])[0], make_entry(1))
        assert reader.contains_many(NS, ["a"]) == [True] and reader.stats()["entries"] == 1
        assert time.monotonic() - start < 0.5
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    reader.close()
    first.close()


# ----- item 14: a failure that repeats is logged once a minute ----------------------------------------------


def test_a_full_store_warns_once_not_on_every_call(backend, tmp_path, caplog):
    store = full_sqlite(tmp_path / "p.db")  # the disk is full: every write fails
    rr = Reranker(backend, store=store)
    with caplog.at_level(logging.WARNING, logger="kalm_rag.engine"):
        for i in range(4):
            rr.score(QUERY, [f"A passage never seen before, number {i}."])  # each call tries to store one
    warnings = [r for r in caplog.records if "could not store" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # before: one per call
    assert "full" in warnings[0].getMessage()
    store.close()


@pytest.mark.redis
def test_a_full_redis_warns_once_even_between_successful_reads(redis_server, caplog):
    store = RedisStore(redis_server.url)
    redis.Redis.from_url(redis_server.url).config_set("maxmemory", "1")  # writes fail with OOM, reads work
    with caplog.at_level(logging.WARNING, logger="kalm_rag.store.redis"):
        for i in range(3):  # what every scoring call does: a read that succeeds, then a write that fails
            assert store.get_many(NS, [f"k{i}"]) == [None]
            with pytest.raises(StoreError, match="refused put_many: .*maxmemory"):
                store.put_many(NS, {f"k{i}": make_entry(i)})
    refused = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in caplog.records]  # before: one per call
    store.close()


def test_an_oversized_entry_in_a_tier_is_not_an_error(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/p.db", memory_tier=64)  # a tier smaller than any entry
    store.put_many(NS, {"a": make_entry(1)})  # stored in SQLite; the tier simply does not keep it
    assert same_entry(store.get_many(NS, ["a"])[0], make_entry(1))
    store.close()


def test_put_many_failures_are_raised_not_swallowed(tmp_path):
    store = full_sqlite(tmp_path / "p.db")
    with pytest.raises(StoreError, match="full"):
        store.put_many(NS, {"a": make_entry(1)})
    store.close()


def test_store_errors_keep_their_types():
    assert issubclass(StoreConfigError, (StoreError, InvalidInputError, ValueError, KalmError))
    assert issubclass(StoreUnavailableError, StoreError) and issubclass(NotStoredError, StoreError)
