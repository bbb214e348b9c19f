"""Helpers of the store tests: deterministic entries and the backends every contract test runs on."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from kalm_rag.store import PooledPassage


def make_entry(
    seed: int, *, n_tokens: int = 13, ratio: int = 4, dim: int = 8, dtype: torch.dtype = torch.float32
) -> PooledPassage:
    """A deterministic entry of ``ceil(n_tokens / ratio)`` MEP windows (the same seed gives the same entry)."""
    W = -(-n_tokens // ratio)
    vectors = torch.randn(W, dim, generator=torch.Generator().manual_seed(seed)).to(dtype)
    counts = torch.full((W,), ratio, dtype=torch.int32)
    counts[-1] = n_tokens - (W - 1) * ratio
    return PooledPassage(vectors, counts, ratio)


def same_entry(a: PooledPassage | None, b: PooledPassage | None) -> bool:
    return (
        a is not None
        and b is not None
        and a.ratio == b.ratio
        and a.vectors.dtype == b.vectors.dtype
        and torch.equal(a.vectors, b.vectors)
        and torch.equal(a.counts, b.counts)
    )


def redis_available() -> bool:
    """Whether Redis tests can run here (or must: ``KALM_RAG_REQUIRE_REDIS`` turns a missing binary into a failure)."""
    return shutil.which("redis-server") is not None or bool(os.environ.get("KALM_RAG_REQUIRE_REDIS"))


BACKENDS = ["memory", "sqlite", "redis", "memory+sqlite", "memory+redis"]
#: ``BACKENDS`` as pytest params, the Redis ones marked ``redis``.
BACKEND_PARAMS = [pytest.param(b, marks=pytest.mark.redis) if "redis" in b else b for b in BACKENDS]


# ----- multiprocess workers (module level, so that a spawn context can import them) ----------------

WORKER_NS = "t5gemma2:workers"


def mp_context():  # -> multiprocessing context
    """``fork`` where the platform has it (fast: no re-import of torch), else ``spawn``."""
    import multiprocessing

    return multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")


def worker_entry(key: str) -> PooledPassage:
    """The one entry every worker writes for ``key`` (so any reader can check what it reads)."""
    seed = int.from_bytes(key.encode()[-8:].rjust(8, b"\0"), "little") % (2**31)
    return make_entry(seed, n_tokens=64 + seed % 64, ratio=1, dim=64)  # 16-32 KiB: spans overflow pages


def concurrent_worker(url: str, worker: int, workers: int, per_worker: int, results) -> None:
    """Write ``per_worker`` entries one transaction each, plus shared keys, reading the others' as it goes."""
    from kalm_rag.store import open_store

    store = open_store(url)
    bad: list[str] = []
    for i in range(per_worker):
        batch = {f"w{worker}-{i}": worker_entry(f"w{worker}-{i}")}
        if i % 5 == 0:
            batch[f"shared-{i}"] = worker_entry(f"shared-{i}")  # every worker writes the same shared keys
        store.put_many(WORKER_NS, batch)
        probe = [f"w{(worker + j) % workers}-{i - j}" for j in range(workers)] + [f"shared-{i - i % 5}"]
        for key, got in zip(probe, store.get_many(WORKER_NS, probe)):
            if got is not None and not same_entry(got, worker_entry(key)):
                bad.append(key)
        if not same_entry(store.get_many(WORKER_NS, [f"w{worker}-{i}"])[0], worker_entry(f"w{worker}-{i}")):
            bad.append(f"own w{worker}-{i}")  # read-your-writes
    results.put((worker, bad, store.stats()["corrupt"]))
    store.close()


def endless_writer(url: str, batch: int, start: int, progress) -> None:
    """Write batches of ``batch`` large entries (one transaction each) until killed; publish the count done."""
    from kalm_rag.store import open_store

    store = open_store(url)
    i = start
    while True:
        store.put_many(WORKER_NS, {f"k{j:06d}": worker_entry(f"k{j:06d}") for j in range(i, i + batch)})
        i += batch
        progress.value = i


def full_sqlite(path):  # -> SQLiteStore
    """A SQLite store on a "full disk": the file may not grow and every free byte is taken, so every write fails
    with SQLite's own "database or disk is full" (the real error, not a mock).
    """
    import sqlite3

    from kalm_rag.store.sqlite import SQLiteStore

    store = SQLiteStore(path)
    conn = store._conn()  # the pragma holds for this thread's connection: use the store from this thread
    conn.execute("PRAGMA max_page_count = 1")  # capped at the current size (it never shrinks a file)
    n = 0
    for size in (4096, 512, 16):  # fill the free pages, then the gaps left in the last ones
        while n < 100_000:
            n += 1
            try:
                conn.execute(
                    "INSERT INTO passages (namespace, key, nbytes, created, value) "
                    "VALUES ('filler', ?, 0, 0, zeroblob(?))",
                    (str(n), size),
                )
            except sqlite3.OperationalError:
                break
    return store
