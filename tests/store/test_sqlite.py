"""SQLite store reliability: concurrent processes, a writer killed mid-write, corrupt bytes, migrations."""

from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest

from kalm_rag.errors import StoreError
from kalm_rag.store import open_store
from kalm_rag.store.migrations import MIGRATIONS, SCHEMA_VERSION
from kalm_rag.store.sqlite import PAGE_SIZE, SQLiteStore, StoreTimeoutError
from tests.store.helpers import (
    WORKER_NS,
    concurrent_worker,
    endless_writer,
    make_entry,
    mp_context,
    same_entry,
    worker_entry,
)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "passages.db"


def test_four_processes_writing_and_reading_lose_nothing_and_read_nothing_torn(db):
    url = f"sqlite:///{db}"
    open_store(url).close()  # create the schema once, as a deployment would
    workers, per_worker = 4, 150
    ctx = mp_context()
    results = ctx.Queue()
    procs = [ctx.Process(target=concurrent_worker, args=(url, w, workers, per_worker, results)) for w in range(workers)]
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    for worker, bad, corrupt in reports:
        assert bad == [], f"worker {worker} read wrong values for {bad[:5]}"
        assert corrupt == 0
    store = SQLiteStore(db)
    expected = [f"w{w}-{i}" for w in range(workers) for i in range(per_worker)]
    expected += [f"shared-{i}" for i in range(0, per_worker, 5)]
    assert sorted(store.iter_keys(WORKER_NS)) == sorted(expected)
    for key, got in zip(expected, store.get_many(WORKER_NS, expected)):
        assert same_entry(got, worker_entry(key)), key
    assert store.stats()["corrupt"] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store.close()


def test_a_writer_killed_mid_write_leaves_only_complete_entries(db):
    url = f"sqlite:///{db}"
    open_store(url).close()
    ctx = mp_context()
    batch, done = 4, 0
    for round_, wait in enumerate((0.0013, 0.0071, 0.0029)):  # kill at different points of a transaction
        # no lock: one the writer held when it was killed would stay held, and reading the count would hang
        progress = ctx.Value("q", done, lock=False)
        writer = ctx.Process(target=endless_writer, args=(url, batch, done, progress))
        writer.start()
        deadline = time.monotonic() + 60
        while progress.value < done + 3 * batch and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(wait)
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
        committed = progress.value  # batches reported done are committed; one more may be too

        store = SQLiteStore(db)
        keys = sorted(store.iter_keys(WORKER_NS))
        assert committed <= len(keys) <= committed + batch, round_
        assert len(keys) % batch == 0  # a batch is one transaction: all of it or none of it
        assert keys == [f"k{j:06d}" for j in range(len(keys))]
        for key, got in zip(keys, store.get_many(WORKER_NS, keys)):
            assert same_entry(got, worker_entry(key)), key
        assert store.stats()["corrupt"] == 0
        store.close()
        done = len(keys)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _raw_value(db, key):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT value FROM passages WHERE key = ?", (key,)).fetchone()[0]


def _set_raw(db, key, value, namespace=None):
    with sqlite3.connect(db) as conn:
        if namespace is None:
            conn.execute("UPDATE passages SET value = ? WHERE key = ?", (value, key))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO passages (namespace, key, nbytes, created, value) VALUES (?, ?, ?, 0, ?)",
                (namespace, key, len(value), value),
            )


@pytest.mark.parametrize("damage", ["flip payload", "flip header", "truncate", "garbage", "empty"])
def test_corrupted_bytes_are_detected_dropped_and_counted(db, damage):
    store = SQLiteStore(db)
    store.put_many("ns", {"a": make_entry(1), "b": make_entry(2)})
    raw = bytearray(_raw_value(db, "a"))
    if damage == "flip payload":
        raw[-5] ^= 0x40
    elif damage == "flip header":
        raw[13] ^= 0x01  # W
    elif damage == "truncate":
        raw = raw[:-4]
    elif damage == "garbage":
        raw = bytearray(os.urandom(len(raw)))
    else:
        raw = bytearray()
    _set_raw(db, "a", bytes(raw))
    assert store.contains_many("ns", ["a"]) == [True]  # not yet read
    got = store.get_many("ns", ["a", "b"])
    assert got[0] is None and same_entry(got[1], make_entry(2))
    stats = store.stats()
    assert stats["corrupt"] == 1 and stats["misses"] == 1 and stats["hits"] == 1
    assert store.contains_many("ns", ["a"]) == [False]  # dropped, so encode() recomputes it
    store.put_many("ns", {"a": make_entry(1)})  # recomputed
    assert same_entry(store.get_many("ns", ["a"])[0], make_entry(1))
    store.close()


def test_a_value_copied_into_another_namespace_or_key_is_not_served(db):
    store = SQLiteStore(db)
    store.put_many("model-a", {"k": make_entry(1)})
    blob = _raw_value(db, "k")
    _set_raw(db, "k", blob, namespace="model-b")
    _set_raw(db, "other-key", blob, namespace="model-a")
    assert store.get_many("model-b", ["k"]) == [None]
    assert store.get_many("model-a", ["other-key"]) == [None]
    assert store.stats()["corrupt"] == 2
    assert same_entry(store.get_many("model-a", ["k"])[0], make_entry(1))
    store.close()


def test_schema_is_migrated_once_and_recorded(db):
    SQLiteStore(db).close()
    SQLiteStore(db).close()
    with sqlite3.connect(db) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY name")]
        assert names == [m.__name__ for m in MIGRATIONS]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA page_size").fetchone()[0] == PAGE_SIZE
        assert conn.execute("SELECT value FROM settings WHERE name = 'value_format'").fetchone()[0] == "1"


def test_a_database_with_the_old_caller_id_table_opens_and_keeps_its_entries(db):
    # a 0.1 database: migrations m001..m003 applied, a passage_ids row, one entry
    old = MIGRATIONS[:3]
    assert [m.__name__ for m in old][-1] == "m003_create_passage_ids"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
    for migration in old:
        migration(conn)
        conn.execute("INSERT INTO _migrations VALUES (?, 0)", (migration.__name__,))
    conn.execute("INSERT INTO passage_ids VALUES ('ns', 'doc-7', 'k')")
    conn.close()
    store = SQLiteStore(db)
    entry = make_entry(2)
    store.put_many("ns", {"k": entry})
    assert same_entry(store.get_many("ns", ["k"])[0], entry)
    store.clear("ns")  # clear() no longer touches passage_ids: the table must be gone, not merely unused
    store.close()
    with sqlite3.connect(db) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "passage_ids" not in tables and "passages" in tables
        assert conn.execute("SELECT count(*) FROM _migrations").fetchone()[0] == len(MIGRATIONS)


def test_a_database_from_a_newer_version_is_refused(db):
    SQLiteStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO _migrations VALUES ('m999_from_the_future', 0)")
    with pytest.raises(StoreError, match="newer kalm-rag"):
        SQLiteStore(db)


def test_a_busy_writer_times_out_with_a_clear_error_while_reads_go_on(db):
    store = SQLiteStore(db, timeout=0.2)
    store.put_many("ns", {"a": make_entry(1)})
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreTimeoutError, match="write lock"):
            store.put_many("ns", {"b": make_entry(2)})
        assert same_entry(store.get_many("ns", ["a"])[0], make_entry(1))  # WAL: readers are not blocked
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.put_many("ns", {"b": make_entry(2)})
    assert store.contains_many("ns", ["b"]) == [True]
    store.close()


def test_a_write_interrupted_by_keyboard_interrupt_rolls_back(db):
    store = SQLiteStore(db)
    with pytest.raises(KeyboardInterrupt), store._write() as conn:
        conn.execute("INSERT INTO passages (namespace, key, nbytes, created, value) VALUES ('ns', 'x', 1, 0, x'')")
        raise KeyboardInterrupt
    assert store.contains_many("ns", ["x"]) == [False]
    store.put_many("ns", {"y": make_entry(1)})  # no transaction left open
    assert store.contains_many("ns", ["y"]) == [True]
    store.close()


def test_a_forked_child_uses_its_own_connection(db):
    ctx = mp_context()
    if ctx.get_start_method() != "fork":
        pytest.skip("no fork() on this platform")
    store = SQLiteStore(db)
    store.put_many("ns", {"parent": make_entry(1)})
    child = ctx.Process(target=_child_writes, args=(store,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert same_entry(store.get_many("ns", ["child"])[0], make_entry(2))
    store.put_many("ns", {"after": make_entry(3)})  # the parent's connection still works
    assert store.stats()["entries"] == 3
    store.close()


def _child_writes(store: SQLiteStore) -> None:
    assert same_entry(store.get_many("ns", ["parent"])[0], make_entry(1))
    store.put_many("ns", {"child": make_entry(2)})
    store.close()


def test_connections_are_per_thread(db):
    import threading

    store = SQLiteStore(db)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(20):
                store.put_many("ns", {f"t{t}-{i}": make_entry(i)})
                assert same_entry(store.get_many("ns", [f"t{t}-{i}"])[0], make_entry(i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.stats()["entries"] == 80
    store.close()
