"""Schema migrations of the SQLite passage store: named functions, each applied once and recorded.

A migration is a function ``mNNN_what_it_does(conn)`` appended to :data:`MIGRATIONS`; never edit or
reorder one that has shipped. :func:`migrate` first reads ``_migrations`` without a lock; only when a
migration is pending does it run the pending ones in order, each inside its own ``BEGIN IMMEDIATE``
transaction (so concurrent openers apply it exactly once), record its name in ``_migrations`` and set
``PRAGMA user_version`` to the number applied. Opening an up-to-date database never waits for a writer.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from kalm_rag.errors import StoreError
from kalm_rag.store.codec import FORMAT_VERSION

Migration = Callable[[sqlite3.Connection], None]


def m001_create_passages(conn: sqlite3.Connection) -> None:
    """Entries keyed by (namespace, key).

    ``nbytes`` duplicates ``length(value)`` and is indexed with the namespace, so ``stats()`` reads a
    small index instead of every row (the blob comes last: the columns before it stay on the row's
    first page, out of its overflow chain).
    """
    conn.execute(
        """CREATE TABLE passages (
            namespace TEXT NOT NULL,
            key TEXT NOT NULL,
            nbytes INTEGER NOT NULL,
            created REAL NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (namespace, key)
        )"""
    )
    conn.execute("CREATE INDEX passages_nbytes ON passages (namespace, nbytes)")


def m002_create_settings(conn: sqlite3.Connection) -> None:
    """Settings that persist with the database (the value format it holds)."""
    conn.execute("CREATE TABLE settings (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO settings (name, value) VALUES ('value_format', ?)", (str(FORMAT_VERSION),))


def m003_create_passage_ids(conn: sqlite3.Connection) -> None:
    """Caller ids (framework document ids) -> passage key, per namespace."""
    conn.execute(
        """CREATE TABLE passage_ids (
            namespace TEXT NOT NULL,
            id TEXT NOT NULL,
            key TEXT NOT NULL,
            PRIMARY KEY (namespace, id)
        )"""
    )


def m004_drop_passage_ids(conn: sqlite3.Connection) -> None:
    """Drop the caller-id table of m003: no API reads or writes it since 0.2 (a database that has it keeps working)."""
    conn.execute("DROP TABLE IF EXISTS passage_ids")


def m005_create_meta(conn: sqlite3.Connection) -> None:
    """Small records per scope (a namespace or a model id): a namespace's codebook, the settings of a model."""
    conn.execute(
        """CREATE TABLE meta (
            scope TEXT NOT NULL,
            name TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (scope, name)
        )"""
    )


MIGRATIONS: list[Migration] = [
    m001_create_passages,
    m002_create_settings,
    m003_create_passage_ids,  # shipped, so kept: databases record its name; m004 undoes it
    m004_drop_passage_ids,
    m005_create_meta,
]
SCHEMA_VERSION = len(MIGRATIONS)


def _pending(conn: sqlite3.Connection, known: list[str]) -> bool:
    """Whether a migration is still to apply (read without a write lock; WAL readers never wait for writers)."""
    try:
        done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return True  # a new database
        raise
    _refuse_newer(done, known)
    return not set(known) <= done


def _refuse_newer(done: set[str], known: list[str]) -> None:
    unknown = sorted(done - set(known))
    if unknown:
        raise StoreError(
            f"the passage database was written by a newer kalm-rag (unknown migrations {unknown}); upgrade kalm-rag"
        )


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply every pending migration to ``conn`` (an autocommit connection); return the names applied.

    Raises:
        StoreError: the database was written by a newer kalm-rag (it records migrations this one lacks).
    """
    known = [m.__name__ for m in MIGRATIONS]
    if not _pending(conn, known):  # the usual case: a plain read, so opening never waits for a writer
        return []
    applied_now = []
    for migration in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)")
            done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
            _refuse_newer(done, known)
            if migration.__name__ not in done:
                migration(conn)
                conn.execute(
                    "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)", (migration.__name__, time.time())
                )
                conn.execute(f"PRAGMA user_version = {len(done) + 1}")
                applied_now.append(migration.__name__)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return applied_now
