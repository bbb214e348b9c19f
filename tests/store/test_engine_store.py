"""The engine on real stores: corrupt values recomputed, Redis restarts survived, a second process
that runs no encoder, and ratios derived from stored windows equal to pooling from scratch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from kalm_rag import Reranker
from kalm_rag.pooling import mep_pool, repool
from kalm_rag.prompt import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_INSTRUCTION
from kalm_rag.store import passage_key
from kalm_rag.store.sqlite import SQLiteStore
from tests.store.helpers import redis_available

QUERY = "What is the capital of France?"
PASSAGES = [
    "Paris is the capital of France.",
    "Bananas are yellow.",
    "The Seine flows through Paris. " * 5,
    "Photosynthesis converts light energy into chemical energy stored in glucose in plants.",
]


def _no_encoder(*args, **kwargs):
    raise AssertionError("the encoder ran although every passage was in the store")


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path}/passages.db"


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    """The tiny model, loaded once; tests build Rerankers around it (and patch it with monkeypatch only)."""
    return Reranker.from_pretrained(tiny_checkpoint).backend


def test_every_score_call_reads_the_store(backend, sqlite_url):
    rr = Reranker(backend, store=sqlite_url)
    rr.score(QUERY, PASSAGES)
    rr.score(QUERY, PASSAGES)
    rr.rerank("another query", PASSAGES[:2])
    stats = rr.store.stats()
    assert stats["entries"] == 4 and stats["misses"] == 4 and stats["hits"] == 4 + 2
    assert rr.counters["encoded_passages"] == 4
    rr.close()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_a_corrupt_stored_value_is_recomputed_not_served(backend, sqlite_url, request, monkeypatch, kind):
    url = sqlite_url if kind == "sqlite" else request.getfixturevalue("redis_server").url
    rr = Reranker(backend, store=url)
    before = rr.score(QUERY, PASSAGES, return_margin=True)
    key = passage_key(PASSAGES[2])
    if kind == "sqlite":
        with rr.store._write() as conn:
            conn.execute(
                "UPDATE passages SET value = substr(value, 1, 100) || x'00' || substr(value, 102) WHERE key = ?", (key,)
            )
    else:
        raw = rr.store._client
        name = rr.store._entry_key(rr.namespace, key)
        blob = bytearray(raw.get(name))
        blob[-3] ^= 0xFF
        raw.set(name, bytes(blob))
    encoded = rr.counters["encoded_passages"]
    after = rr.score(QUERY, PASSAGES, return_margin=True)
    assert rr.counters["encoded_passages"] == encoded + 1  # only the damaged passage
    assert rr.store.stats()["corrupt"] == 1
    assert after == pytest.approx(before, abs=1e-5)
    monkeypatch.setattr(rr.backend, "encode", _no_encoder)  # and the recomputed value is stored again
    assert rr.score(QUERY, PASSAGES, return_margin=True) == pytest.approx(before, abs=1e-5)
    rr.close()


@pytest.mark.redis
def test_a_redis_restart_mid_run_does_not_stop_scoring(backend, redis_server, monkeypatch):
    rr = Reranker(backend, store=f"{redis_server.url}?retry_after=0&connect_timeout=0.5")
    baseline = rr.score(QUERY, PASSAGES, return_margin=True)
    assert rr.store.stats()["entries"] == 4

    encode = rr.backend.encode

    def encode_while_redis_dies(*args, **kwargs):
        redis_server.stop()  # after the lookups, before the writes: the server dies mid-call
        return encode(*args, **kwargs)

    monkeypatch.setattr(rr.backend, "encode", encode_while_redis_dies)
    new = PASSAGES + ["Mount Everest rises 8849 metres above sea level."]
    during = rr.score(QUERY, new, return_margin=True)  # no crash: the new passage is encoded, its write skipped
    assert during[:4] == pytest.approx(baseline, abs=1e-5)
    monkeypatch.setattr(rr.backend, "encode", encode)
    outage = rr.score(QUERY, new, return_margin=True)  # everything recomputed while the server is down
    assert outage == pytest.approx(during, abs=1e-5)
    assert rr.counters["encoded_passages"] == 4 + 1 + 5

    redis_server.start()  # back, empty
    back = rr.score(QUERY, new, return_margin=True)
    assert back == pytest.approx(during, abs=1e-5)
    assert rr.store.stats()["entries"] == 5  # the cache fills again
    monkeypatch.setattr(rr.backend, "encode", _no_encoder)
    assert rr.score(QUERY, new, return_margin=True) == pytest.approx(during, abs=1e-5)
    rr.close()


SECOND_PROCESS = textwrap.dedent("""
    import json, sys
    from kalm_rag import Reranker

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder ran in the second process")

    checkpoint, query, passages, urls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
    backend = Reranker.from_pretrained(checkpoint).backend
    backend.encode = no_encoder
    for url in urls:
        rr = Reranker(backend, store=url)
        margins = rr.score(query, passages, return_margin=True)
        ranked = [r.index for r in rr.rerank(query, passages)]
        print(json.dumps({"url": url, "margins": margins, "ranked": ranked,
                          "encoded": rr.counters["encoded_passages"], "stats": rr.store.stats()}))
        rr.close()
""")


def test_a_second_process_scores_what_the_first_encoded_without_the_encoder(
    tiny_checkpoint, backend, sqlite_url, request
):
    urls = [sqlite_url]
    if redis_available():  # one subprocess checks both backends (it costs a model load)
        urls.append(request.getfixturevalue("redis_server").url)
    expected = {}
    for url in urls:
        first = Reranker(backend, store=url)
        assert first.encode(PASSAGES).encoded == 4
        ranked = [r.index for r in first.rerank(QUERY, PASSAGES)]
        expected[url] = (first.score(QUERY, PASSAGES, return_margin=True), ranked)
        first.close()
    out = subprocess.run(
        [sys.executable, "-c", SECOND_PROCESS, str(tiny_checkpoint), QUERY, json.dumps(PASSAGES), *urls],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    reports = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["url"] for r in reports] == urls
    for report in reports:
        margins, ranked = expected[report["url"]]
        assert report["encoded"] == 0
        assert report["stats"]["misses"] == 0 and report["stats"]["hits"] == 8
        assert report["margins"] == pytest.approx(margins, abs=1e-6)
        assert report["ranked"] == ranked


@pytest.mark.parametrize("base_ratio, ratio", [(2, 4), (4, 8), (4, 16), (8, 32)])
def test_ratios_derived_from_stored_windows_equal_pooling_from_scratch(backend, sqlite_url, base_ratio, ratio):
    store = SQLiteStore(sqlite_url.removeprefix("sqlite:///"))
    fine = Reranker(backend, store=store, base_ratio=1)
    coarse = Reranker(backend, store=store, base_ratio=base_ratio, ratio=ratio)
    assert fine.namespace != coarse.namespace
    from_fine = torch.tensor(fine.score(QUERY, PASSAGES, ratio=ratio, return_margin=True))
    from_coarse = torch.tensor(coarse.score(QUERY, PASSAGES, ratio=ratio, return_margin=True))
    scratch = torch.tensor([_margin_pooled_from_scratch(fine, p, ratio) for p in PASSAGES])
    assert (from_fine - scratch).abs().max() <= 1e-5
    assert (from_coarse - scratch).abs().max() <= 1e-5
    # and the stored windows themselves, re-pooled, equal windows pooled from scratch
    for p in PASSAGES:
        hidden, mask = _encoder_states(fine, p)
        direct, direct_counts = mep_pool(hidden, mask, ratio)
        for rr, base in ((fine, 1), (coarse, base_ratio)):
            entry = store.get_many(rr.namespace, [passage_key(p)])[0]
            assert entry.ratio == base
            derived, counts = repool(entry.vectors, entry.counts, ratio // base)
            assert torch.equal(counts, direct_counts[0])
            assert (derived - direct[0]).abs().max() <= 1e-5
    store.close()


def _encoder_states(rr: Reranker, passage: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = rr.backend.tokenize_passages([passage], rr.max_passage_tokens)[0]
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    return rr.backend.encode(input_ids, mask).float(), mask  # (1, n, d), (1, n)


def _margin_pooled_from_scratch(rr: Reranker, passage: str, ratio: int) -> float:
    """The margin with the passage encoded and MEP-pooled at ``ratio`` directly (no store, no re-pooling)."""
    hidden, mask = _encoder_states(rr, passage)
    pooled, _ = mep_pool(hidden, mask, ratio)  # (1, W, d)
    prompt = rr.backend.prompt_ids(
        QUERY,
        instruction=DEFAULT_INSTRUCTION,
        system_instruction=DEFAULT_SYSTEM_INSTRUCTION,
        max_query_tokens=rr.max_query_tokens,
    )
    window_mask = torch.ones(pooled.shape[:2], dtype=torch.long)
    return float(rr.backend.margins(prompt, pooled, window_mask)[0])


def test_bfloat16_storage_halves_the_bytes_and_keeps_scores_close(backend, sqlite_url):
    store = SQLiteStore(sqlite_url.removeprefix("sqlite:///"))
    fp32 = Reranker(backend, store=store)
    bf16 = Reranker(backend, store=store, storage_dtype="bfloat16")
    assert fp32.namespace != bf16.namespace
    a = torch.tensor(fp32.score(QUERY, PASSAGES, ratio=4))
    b = torch.tensor(bf16.score(QUERY, PASSAGES, ratio=4))
    assert (a - b).abs().max() <= 1e-2
    key = passage_key(PASSAGES[2])
    e32, e16 = store.get_many(fp32.namespace, [key])[0], store.get_many(bf16.namespace, [key])[0]
    assert e16.vectors.dtype == torch.bfloat16 and e32.vectors.dtype == torch.float32
    assert e16.nbytes * 2 == e32.vectors.numel() * 4 + e32.counts.numel() * 8
    store.close()
