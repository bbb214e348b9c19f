"""The memory LRU stays under max_bytes whatever is thrown at it, alone or as a tier before a backend."""

from __future__ import annotations

import pytest

from kalm_rag.errors import StoreError
from kalm_rag.store import MemoryStore, open_store
from kalm_rag.store.codec import encode_entry
from tests.store.helpers import make_entry, same_entry

NS = "ns"


def _stored(entry):
    """Bytes the memory store charges for ``entry``: its encoded size (the tier holds codec bytes)."""
    return len(encode_entry(NS, "k", entry))


def test_memory_store_respects_max_bytes_under_a_stream_larger_than_it():
    entry_bytes = _stored(make_entry(0, n_tokens=64, ratio=1, dim=32))
    store = MemoryStore(max_bytes=10 * entry_bytes + entry_bytes // 2)
    for start in range(0, 300, 7):  # batches of 7, 300 entries: 30x the budget
        store.put_many(NS, {f"k{i}": make_entry(i, n_tokens=64, ratio=1, dim=32) for i in range(start, start + 7)})
        stats = store.stats()
        assert stats["bytes"] <= stats["max_bytes"]
    assert stats["entries"] == 10
    assert stats["evictions"] == 301 - 10  # 301 entries written (43 batches of 7)
    assert stats["bytes"] == 10 * entry_bytes


def test_least_recently_used_entries_go_first():
    size = _stored(make_entry(0))
    store = MemoryStore(max_bytes=3 * size)
    store.put_many(NS, {"a": make_entry(0), "b": make_entry(1), "c": make_entry(2)})
    store.get_many(NS, ["a"])  # a is now the most recent
    store.put_many(NS, {"d": make_entry(3)})
    assert store.contains_many(NS, ["a", "b", "c", "d"]) == [True, False, True, True]


def test_an_entry_larger_than_the_budget_is_not_kept_and_evicts_nothing():
    store = MemoryStore(max_bytes=_stored(make_entry(0)))
    store.put_many(NS, {"small": make_entry(0)})
    with pytest.raises(StoreError, match="1 of 1 entries are larger than the memory store's max_bytes"):
        store.put_many(NS, {"huge": make_entry(1, n_tokens=400)})  # not kept, and the caller is told
    assert store.contains_many(NS, ["small", "huge"]) == [True, False]


def test_a_tier_bounded_by_max_bytes_before_sqlite_keeps_everything_in_the_backend(tmp_path):
    entry_bytes = _stored(make_entry(0, n_tokens=64, ratio=1, dim=32))
    store = open_store(f"sqlite:///{tmp_path}/p.db", memory_tier=5 * entry_bytes)
    for i in range(50):
        store.put_many(NS, {f"k{i}": make_entry(i, n_tokens=64, ratio=1, dim=32)})
        assert store.stats()["memory_bytes"] <= 5 * entry_bytes
    got = store.get_many(NS, [f"k{i}" for i in range(50)])
    assert all(same_entry(g, make_entry(i, n_tokens=64, ratio=1, dim=32)) for i, g in enumerate(got))
    stats = store.stats()
    assert stats["entries"] == 50 and stats["memory_entries"] == 5 and stats["memory_bytes"] <= 5 * entry_bytes
    assert stats["hits"] == 50 and stats["misses"] == 0
    store.get_many(NS, ["k49", "k48"])  # the most recent are served by the tier
    assert store.stats()["memory_hits"] >= 2
    store.close()


@pytest.mark.parametrize("bad", [0, -1])
def test_max_bytes_must_be_positive(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(max_bytes=bad)
