"""Property-based tests (issue #15): whatever a caller passes, the public API either works or raises a
``KalmError`` with a message, never another exception type.

Kept fast: a tiny model, short texts, a few dozen examples per property, no deadline (the machine is shared).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kalm_rag import KalmError, Reranker
from kalm_rag.store import MemoryStore, PassageStore, open_store, parse_bytes

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["2GB", "1e3", "-1", "inf", "nan", "0", " 5 ", "1.5MiB", "true", "none", "x" * 30]),
)
names = st.sampled_from(
    [
        "max_bytes",
        "timeout",
        "memory_tier",
        "prefix",
        "ttl",
        "socket_timeout",
        "connect_timeout",
        "retry_after",
        "max_retry_after",
        "db",
        "password",
        "health_check_interval",
        "max_connections",
        "socket_keepalive",
        "ssl_cert_reqs",
        "colour",
        "",
    ]
)
query_values = st.one_of(anything, st.text(alphabet="abc0123456789.eEiInfMGBK-+ %/&=", max_size=10))


@st.composite
def store_urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["memory", "sqlite", "redis", "rediss", "unix", "SQLite", "http", "", "file"]))
    netloc = draw(
        st.one_of(st.just(""), st.sampled_from(["localhost", "h:1", ":p@ss@h", "[::1", "h:99999"]), st.text(max_size=8))
    )
    path = draw(
        st.one_of(
            st.just(""), st.sampled_from(["/", "/0", "/abc", "/p.db", "//abs.db", "/:memory:"]), st.text(max_size=8)
        )
    )
    params = draw(st.lists(st.tuples(names, query_values), max_size=3))
    query = "&".join(f"{k}={v}" for k, v in params)
    sep = draw(st.sampled_from(["://", ":", ":///", "//"]))
    return f"{scheme}{sep}{netloc}{path}" + (f"?{query}" if query else "")


def _closing(store: PassageStore) -> None:
    assert isinstance(store, PassageStore)
    store.close()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run in an empty folder: SQLite URLs with relative paths create their files there."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@FAST
@given(url=st.one_of(st.text(max_size=40), store_urls()))
def test_open_store_works_or_raises_a_kalm_error(in_tmp, url):
    try:
        store = open_store(url)
    except KalmError as exc:
        assert str(exc)
    else:
        _closing(store)


@FAST
@given(
    scheme=st.sampled_from(["memory://", "sqlite:///p.db", "redis://localhost/0"]),
    options=st.dictionaries(names, anything, max_size=3),
)
def test_open_store_keyword_options_work_or_raise_a_kalm_error(in_tmp, scheme, options):
    try:
        store = open_store(scheme, **options)
    except KalmError as exc:
        assert str(exc)
    else:
        _closing(store)


@settings(max_examples=80, deadline=None)
@given(value=st.one_of(anything, st.text(alphabet="0123456789.eE+-kKmMgGtTiIbB _", max_size=12)))
def test_parse_bytes_gives_a_non_negative_int_or_a_kalm_error(value):
    try:
        size = parse_bytes(value)
    except KalmError as exc:
        assert str(exc)
    else:
        assert isinstance(size, int) and 0 <= size < 2**63


# ----- the engine's public API ---------------------------------------------------------------------------

texts = st.text(min_size=0, max_size=30)
passage_lists = st.one_of(
    st.lists(texts, max_size=4),
    st.lists(st.one_of(texts, st.none(), st.integers(), st.binary(max_size=4)), max_size=3),
    texts,
    st.none(),
    st.integers(),
)
ratios = st.one_of(
    st.none(), st.integers(min_value=-3, max_value=40), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3)
)
top_ks = st.one_of(st.none(), st.integers(min_value=-2, max_value=6), st.floats(allow_nan=True), st.booleans())


@pytest.fixture(scope="module")
def rr(tiny_checkpoint):
    reranker = Reranker.from_pretrained(tiny_checkpoint, store=MemoryStore(max_bytes=64 << 20))
    yield reranker
    reranker.close()


@FAST
@given(query=st.one_of(texts, st.none(), st.integers()), passages=passage_lists, ratio=ratios, top_k=top_ks)
def test_score_and_rerank_work_or_raise_a_kalm_error(rr, query, passages, ratio, top_k):
    try:
        scores = rr.score(query, passages, ratio=ratio)
    except KalmError as exc:
        assert str(exc)
    else:
        assert len(scores) == len(passages)
        assert all(isinstance(s, float) and 0.0 <= s <= 1.0 and not math.isnan(s) for s in scores)
    try:
        ranked = rr.rerank(query, passages, ratio=ratio, top_k=top_k)
    except KalmError as exc:
        assert str(exc)
    else:
        assert sorted(r.index for r in ranked) == sorted(set(r.index for r in ranked))
        assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
        assert len(ranked) == min(len(passages), top_k or len(passages))


@FAST
@given(passages=passage_lists, strict=st.one_of(st.booleans(), st.none(), st.integers(max_value=2, min_value=0)))
def test_encode_works_or_raises_a_kalm_error(rr, passages, strict):
    try:
        report = rr.encode(passages, strict=strict)
    except KalmError as exc:
        assert str(exc)
    else:
        assert report.passages == report.already_present + report.stored + report.not_stored
        assert report.ok and report.passages == len(set(passages))


@FAST
@given(
    options=st.dictionaries(
        st.sampled_from(
            ["ratio", "base_ratio", "batch_size", "max_query_tokens", "max_passage_tokens", "storage_dtype",
             "instruction", "system_instruction", "show_progress_bar", "store"]
        ),
        st.one_of(anything, st.sampled_from(["float32", "bfloat16", "memory://", "sqlite:///p.db", "bogus://"])),
        max_size=3,
    )
)  # fmt: skip
def test_reranker_options_work_or_raise_a_kalm_error(rr, in_tmp, options):
    try:
        other = Reranker(rr.backend, **options)
    except KalmError as exc:
        assert str(exc)
    else:
        assert other.namespace.startswith(rr.backend.family + ":")
        other.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.one_of(st.text(max_size=30), st.sampled_from(["kalm-mni", "a/b", "org/name", ".", "/", "~", "..//x"])))
def test_loading_a_model_by_any_name_works_or_raises_a_kalm_error_offline(in_tmp, monkeypatch, name):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.fspath(in_tmp / "hub"))
    try:
        Reranker.from_pretrained(name)
    except KalmError as exc:
        assert str(exc)
