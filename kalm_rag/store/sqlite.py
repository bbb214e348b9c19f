"""SQLite passage store: embedded, persistent, safe with several processes reading and writing at once.

One database file holds every namespace. The database runs in WAL mode with ``synchronous=NORMAL``
(readers never block the writer; a power loss may drop the last transactions but never corrupts the
file), and every write is one ``BEGIN IMMEDIATE`` transaction that rolls back on any exception,
including ``KeyboardInterrupt``. A process killed mid-write therefore leaves only complete entries.

Connections are per thread, closed when their thread ends (so short-lived threads do not pile up open
files), and re-created in a forked child (a connection is never used, nor closed, across ``fork``).
Values are :mod:`kalm_rag.store.codec` bytes; a value that fails its checks is counted in
``stats()["corrupt"]``, deleted, and reported as a miss.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from kalm_rag.errors import StoreConfigError, StoreError
from kalm_rag.store.base import PassageStore, PooledPassage
from kalm_rag.store.codebooks import codebook_lookup
from kalm_rag.store.codec import CorruptEntryError, decode_entry, encode_entry
from kalm_rag.store.migrations import SCHEMA_VERSION, migrate
from kalm_rag.store.options import check_seconds

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds a writer waits for another process's write lock before StoreTimeoutError
PAGE_SIZE = 16384  # values are tens to hundreds of KB: 16 KiB pages read them ~40 % faster than 4 KiB ones
_CHUNK = 500  # keys per "IN (...)" query, well under SQLite's bound-parameter limit
_PAGE = 1000  # keys per page of iter_keys

# Connections inherited through fork(): kept referenced so they are never closed in the child (closing
# one there could act on the parent's locks and WAL), and never used again.
_INHERITED: list[sqlite3.Connection] = []


class _ThreadConnection:
    """A thread's connection, held by its ``threading.local``: closed when the thread ends (the local's
    data is dropped then), by :meth:`SQLiteStore.close`, never in a forked child.
    """

    __slots__ = ("__weakref__", "conn", "generation", "pid")

    def __init__(self, conn: sqlite3.Connection, generation: int) -> None:
        self.conn, self.pid, self.generation = conn, os.getpid(), generation

    def close(self) -> None:
        if self.pid == os.getpid():
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()

    def __del__(self) -> None:
        self.close()


class StoreTimeoutError(StoreError):
    """Another process held the SQLite write lock longer than the store's ``timeout``."""


class SQLiteStore(PassageStore):
    """A persistent passage store in one SQLite file.

    Args:
        path: database file; created (with its parent folders) if missing.
        timeout: seconds to wait for another writer's lock before raising :class:`StoreTimeoutError`
            (``0 < timeout <= 1e6``).

    Raises:
        StoreConfigError: a bad path or timeout.
        StoreError: the file cannot be created or opened, or was written by a newer kalm-rag.

    Example:
        >>> import tempfile, torch
        >>> from kalm_rag.store import PooledPassage
        >>> store = SQLiteStore(tempfile.mkdtemp() + "/passages.db")
        >>> store.put_many("ns", {"k": PooledPassage(torch.ones(2, 3), torch.tensor([4, 1], dtype=torch.int32), 4)})
        >>> store.get_many("ns", ["k", "absent"])[0].counts.tolist()
        [4, 1]
        >>> {k: store.stats()[k] for k in ("entries", "hits", "misses")}
        {'entries': 1, 'hits': 1, 'misses': 1}
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        checked = check_seconds(timeout, "timeout")
        assert checked is not None  # allow_none is off
        if not isinstance(path, (str, os.PathLike)):
            raise StoreConfigError(f"path must be a str or a path, got {type(path).__name__}")
        try:
            self.path = Path(os.path.abspath(os.path.expanduser(path)))
        except (TypeError, ValueError) as exc:  # bytes paths, NUL characters
            raise StoreConfigError(f"bad SQLite store path {path!r:.200}: {exc}") from None
        if "\0" in str(self.path) or os.fspath(path) in (":memory:", ""):
            raise StoreConfigError(f"bad SQLite store path {path!r:.200}: give a database file (memory:// for no file)")
        self.timeout = checked
        self._local = threading.local()
        self._lock = threading.Lock()  # guards the counters and the connection list
        self._generation = 0  # bumped by close(): every thread reconnects on next use
        self._connections: weakref.WeakSet[_ThreadConnection] = weakref.WeakSet()
        self._counters = {"hits": 0, "misses": 0, "corrupt": 0}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot create the folder of the passage database {self.path}: {exc}") from exc
        with self._errors("open"):
            migrate(self._conn())

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # ----- connections and transactions ----------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use, after ``close()`` and in a forked child."""
        local = self._local
        held: _ThreadConnection | None = getattr(local, "held", None)
        if held is not None and held.pid != os.getpid():
            _INHERITED.append(held.conn)
            held = None
        if held is None or held.generation != self._generation:
            with self._errors("connect"):
                conn = self._connect()
            held = _ThreadConnection(conn, self._generation)
            with self._lock:
                self._connections.add(held)
            local.held = held
        return held.conn

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: autocommit; transactions are explicit BEGIN IMMEDIATE ... COMMIT.
        # check_same_thread=False only so that close() may close every thread's connection.
        conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # takes effect only on a new, empty file
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            conn.close()
            raise StoreError(f"SQLite refused WAL mode for {self.path} (got {mode!r}); use a local file system")
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: committed on success, rolled back on any exception."""
        conn = self._conn()
        with self._errors("write"):
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:  # KeyboardInterrupt too, and a failed COMMIT (disk full)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn ``sqlite3`` errors into :class:`StoreError` (a busy lock into :class:`StoreTimeoutError`)."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            message = str(exc).lower()
            if "locked" in message or "busy" in message:
                raise StoreTimeoutError(
                    f"{action} on {self.path}: another process held the write lock for more than "
                    f"{self.timeout:g}s (raise the store's timeout)"
                ) from exc
            raise StoreError(f"{action} on {self.path} failed: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"{action} on {self.path} failed: {exc}") from exc

    def _select(self, sql: str, namespace: str, values: Sequence[str]) -> Iterator[tuple]:
        """Rows of ``sql`` (with ``{marks}`` for an IN list) over ``values`` in chunks."""
        conn = self._conn()
        for start in range(0, len(values), _CHUNK):
            chunk = values[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            with self._errors("read"):
                rows = conn.execute(sql.format(marks=marks), (namespace, *chunk)).fetchall()
            yield from rows

    # ----- PassageStore --------------------------------------------------------------------------

    def get_many(self, namespace: str, keys: Sequence[str]) -> list[PooledPassage | None]:
        # CAST: a value damaged into TEXT still comes back as bytes (and then fails its checks)
        unique = list(dict.fromkeys(keys))
        sql = "SELECT key, CAST(value AS BLOB) FROM passages WHERE namespace = ? AND key IN ({marks})"
        blobs = dict(self._select(sql, namespace, unique))
        decoded: dict[str, PooledPassage] = {}
        lookup = codebook_lookup(self, namespace)
        for key, blob in blobs.items():
            try:
                decoded[key] = decode_entry(blob, namespace=namespace, key=key, lookup=lookup)
            except CorruptEntryError as exc:
                self._drop_corrupt(namespace, key, blob, exc)
        out = [decoded.get(key) for key in keys]
        hits = sum(entry is not None for entry in out)
        with self._lock:
            self._counters["hits"] += hits
            self._counters["misses"] += len(out) - hits
        return out

    def _drop_corrupt(self, namespace: str, key: str, blob: bytes, exc: CorruptEntryError) -> None:
        """Count a bad value and delete it, unless another writer has replaced it meanwhile."""
        logger.warning("dropping a corrupt passage entry %s/%s in %s: %s", namespace, key[:16], self.path, exc.reason)
        with self._lock:
            self._counters["corrupt"] += 1
        try:
            with self._write() as conn:
                conn.execute(
                    "DELETE FROM passages WHERE namespace = ? AND key = ? AND CAST(value AS BLOB) = ?",
                    (namespace, key, blob),
                )
        except StoreError as err:  # the value is not served either way; the next put replaces it
            logger.warning("could not delete the corrupt entry: %s", err)

    def put_many(self, namespace: str, entries: Mapping[str, PooledPassage]) -> None:
        now = time.time()
        rows = []
        for key, entry in entries.items():
            blob = encode_entry(namespace, key, entry)
            rows.append((namespace, key, len(blob), now, blob))
        if not rows:
            return
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO passages (namespace, key, nbytes, created, value) VALUES (?, ?, ?, ?, ?)", rows
            )

    def contains_many(self, namespace: str, keys: Sequence[str]) -> list[bool]:
        found = {
            row[0]
            for row in self._select(
                "SELECT key FROM passages WHERE namespace = ? AND key IN ({marks})",
                namespace,
                list(dict.fromkeys(keys)),
            )
        }
        return [key in found for key in keys]

    def delete_many(self, namespace: str, keys: Sequence[str]) -> int:
        unique = list(dict.fromkeys(keys))
        deleted = 0
        with self._write() as conn:
            for start in range(0, len(unique), _CHUNK):
                chunk = unique[start : start + _CHUNK]
                cursor = conn.execute(
                    f"DELETE FROM passages WHERE namespace = ? AND key IN ({','.join('?' * len(chunk))})",
                    (namespace, *chunk),
                )
                deleted += cursor.rowcount
        return deleted

    def clear(self, namespace: str | None = None) -> None:
        with self._write() as conn:
            if namespace is None:
                conn.execute("DELETE FROM passages")
                conn.execute("DELETE FROM meta")
            else:
                conn.execute("DELETE FROM passages WHERE namespace = ?", (namespace,))
                conn.execute("DELETE FROM meta WHERE scope = ?", (namespace,))

    def get_meta(self, scope: str, name: str) -> bytes | None:
        with self._errors("read"):
            row = (
                self._conn()
                .execute("SELECT CAST(value AS BLOB) FROM meta WHERE scope = ? AND name = ?", (scope, name))
                .fetchone()
            )
        return None if row is None else bytes(row[0])

    def put_meta_if_absent(self, scope: str, name: str, value: bytes) -> bytes:
        with self._write() as conn:  # INSERT OR IGNORE then re-read, in one transaction: the first writer wins
            conn.execute("INSERT OR IGNORE INTO meta (scope, name, value) VALUES (?, ?, ?)", (scope, name, value))
            row = conn.execute(
                "SELECT CAST(value AS BLOB) FROM meta WHERE scope = ? AND name = ?", (scope, name)
            ).fetchone()
        return bytes(row[0])

    def delete_meta(self, scope: str, name: str, value: bytes | None = None) -> None:
        with self._write() as conn:
            if value is None:
                conn.execute("DELETE FROM meta WHERE scope = ? AND name = ?", (scope, name))
            else:
                conn.execute(
                    "DELETE FROM meta WHERE scope = ? AND name = ? AND CAST(value AS BLOB) = ?", (scope, name, value)
                )

    def iter_keys(self, namespace: str) -> Iterator[str]:
        """Keys of ``namespace`` in sorted order, read a page at a time (writes may go on meanwhile)."""
        last = ""
        while True:
            with self._errors("read"):
                page = [
                    row[0]
                    for row in self._conn().execute(
                        "SELECT key FROM passages WHERE namespace = ? AND key > ? ORDER BY key LIMIT ?",
                        (namespace, last, _PAGE),
                    )
                ]
            yield from page
            if len(page) < _PAGE:
                return
            last = page[-1]

    def stats(self) -> dict[str, int]:
        """``entries`` and ``bytes`` (encoded values) of the whole file; the other counters are this process's."""
        with self._errors("read"):
            entries, nbytes = self._conn().execute("SELECT count(*), coalesce(sum(nbytes), 0) FROM passages").fetchone()
        with self._lock:
            counters = dict(self._counters)
        return {
            "entries": entries,
            "bytes": nbytes,
            "bytes_per_passage": nbytes // max(1, entries),
            **counters,
            "schema_version": SCHEMA_VERSION,
        }

    def close(self) -> None:
        """Close this process's connections (every thread's); the store reconnects if used again."""
        with self._lock:
            held = list(self._connections)
            self._connections = weakref.WeakSet()
            self._generation += 1
        for connection in held:  # connections inherited through fork are never closed (see _INHERITED)
            connection.close()
