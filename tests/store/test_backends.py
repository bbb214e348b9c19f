"""The PassageStore contract, run on every backend: memory, SQLite, Redis, and a memory tier before each."""

from __future__ import annotations

import pytest
import torch

from kalm_rag.store import PooledPassage, passage_key
from tests.store.helpers import BACKEND_PARAMS, make_entry, same_entry

#: Backends that serialise entries (everything but the bare memory store).
PERSISTENT = [p for p in BACKEND_PARAMS if p != "memory"]

NS = "t5gemma2:aaaa"
OTHER_NS = "t5gemma2:bbbb"


def keys_of(n: int) -> list[str]:
    return [passage_key(f"passage {i}") for i in range(n)]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_put_then_get_returns_equal_entries_and_none_for_missing(store_factory, backend):
    store = store_factory(backend)
    keys = keys_of(5)
    store.put_many(NS, {k: make_entry(i) for i, k in enumerate(keys[:3])})
    got = store.get_many(NS, [keys[0], keys[4], keys[2], keys[0]])
    assert same_entry(got[0], make_entry(0)) and same_entry(got[2], make_entry(2)) and same_entry(got[3], make_entry(0))
    assert got[1] is None
    stats = store.stats()
    assert stats["entries"] == 3 and stats["bytes"] > 0
    assert stats["hits"] == 3 and stats["misses"] == 1 and stats["corrupt"] == 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_bfloat16_entries_round_trip(store_factory, backend):
    store = store_factory(backend)
    entry = make_entry(7, dtype=torch.bfloat16)
    store.put_many(NS, {"k": entry})
    assert same_entry(store.get_many(NS, ["k"])[0], entry)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_namespaces_never_share_entries(store_factory, backend):
    store = store_factory(backend)
    key = passage_key("the same text")
    store.put_many(NS, {key: make_entry(1)})
    assert store.get_many(OTHER_NS, [key]) == [None]
    assert store.contains_many(OTHER_NS, [key]) == [False]
    store.put_many(OTHER_NS, {key: make_entry(2)})
    assert same_entry(store.get_many(NS, [key])[0], make_entry(1))
    assert same_entry(store.get_many(OTHER_NS, [key])[0], make_entry(2))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_put_replaces_contains_delete_clear_and_iter_keys(store_factory, backend):
    store = store_factory(backend)
    keys = keys_of(4)
    store.put_many(NS, {k: make_entry(i) for i, k in enumerate(keys)})
    store.put_many(OTHER_NS, {keys[0]: make_entry(9)})
    store.put_many(NS, {keys[1]: make_entry(11)})  # replace
    assert same_entry(store.get_many(NS, [keys[1]])[0], make_entry(11))
    assert sorted(store.iter_keys(NS)) == sorted(keys)
    assert store.contains_many(NS, [keys[0], "absent"]) == [True, False]
    assert store.delete_many(NS, [keys[0], keys[0], "absent"]) == 1
    assert store.get_many(NS, [keys[0]]) == [None]
    assert store.contains_many(NS, [keys[0]]) == [False]
    store.clear(NS)
    assert list(store.iter_keys(NS)) == []
    assert store.contains_many(OTHER_NS, [keys[0]]) == [True]
    store.clear()
    assert store.stats()["entries"] == 0


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_iter_keys_pages_through_many_keys(store_factory, backend):
    store = store_factory(backend)
    keys = keys_of(2500)
    entry = make_entry(0, n_tokens=2, ratio=4, dim=2)
    for start in range(0, len(keys), 500):
        store.put_many(NS, {k: entry for k in keys[start : start + 500]})
    assert sorted(store.iter_keys(NS)) == sorted(keys)
    assert store.stats()["entries"] == 2500
    assert sum(store.contains_many(NS, keys)) == 2500
    assert all(e is not None for e in store.get_many(NS, keys))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_calls_are_no_ops(store_factory, backend):
    store = store_factory(backend)
    assert store.get_many(NS, []) == []
    store.put_many(NS, {})
    assert store.contains_many(NS, []) == []
    assert store.delete_many(NS, []) == 0
    assert store.healthy()


@pytest.mark.parametrize("backend", PERSISTENT)
def test_persistent_backends_keep_entries_across_reopen(store_factory, backend):
    first = store_factory(backend)
    first.put_many(NS, {"k": make_entry(3)})
    first.close()
    second = store_factory(backend.replace("memory+", ""))
    assert same_entry(second.get_many(NS, ["k"])[0], make_entry(3))


@pytest.mark.parametrize("backend", PERSISTENT)
def test_a_malformed_entry_is_refused_on_put(store_factory, backend):
    store = store_factory(backend)
    bad = PooledPassage(torch.zeros(2, 3), torch.ones(3, dtype=torch.int32), 1)
    with pytest.raises(Exception, match="counts must be"):
        store.put_many(NS, {"k": bad})
    assert store.get_many(NS, ["k"]) == [None]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_closed_store_reconnects_when_used_again(store_factory, backend):
    # Reranker.close() closes its store, which other rerankers may share
    store = store_factory(backend)
    store.put_many(NS, {"k": make_entry(1)})
    store.close()
    assert same_entry(store.get_many(NS, ["k"])[0], make_entry(1))
