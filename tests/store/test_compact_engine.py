"""The engine with compact storage: storage= end to end, settings adopted from the store, codebook training."""

from __future__ import annotations

import pytest
import torch

from kalm_rag import Reranker
from kalm_rag.errors import InvalidInputError, KalmError
from kalm_rag.store import MemoryStore, passage_key, quantize
from kalm_rag.store import settings as store_settings
from kalm_rag.store.codebooks import CODEBOOK_RECORD
from kalm_rag.store.settings import COMPACT_DEFAULTS, LEGACY_DEFAULTS, StoreSettingsError, family_defaults

QUERY = "What is the capital of France?"
PASSAGES = [
    "Paris is the capital of France.",
    "Bananas are yellow.",
    "The Seine flows through Paris. " * 5,
    "Photosynthesis converts light energy into chemical energy stored in glucose in plants.",
    "The Eiffel Tower was completed in 1889 for the World's Fair. " * 3,
    "Mount Everest is the highest mountain above sea level.",
]


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    return Reranker.from_pretrained(tiny_checkpoint).backend


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path}/passages.db"


def _no_encoder(*args, **kwargs):
    raise AssertionError("the encoder ran although every passage was in the store")


def _stored_storages(rr: Reranker) -> list[str | None]:
    entries = rr.store.get_many(rr.namespace, [passage_key(p) for p in PASSAGES])
    return [None if e is None else e.storage for e in entries]


def test_int8_scores_close_to_float32_and_a_second_reranker_adopts_it(backend, url, tmp_path, monkeypatch):
    exact = Reranker(backend, store=f"sqlite:///{tmp_path}/exact.db", base_ratio=1)
    reference = torch.tensor(exact.score(QUERY, PASSAGES, return_margin=True))
    rr = Reranker(backend, store=url, storage="int8", base_ratio=1)
    rr.encode(PASSAGES)
    assert _stored_storages(rr) == ["int8"] * len(PASSAGES)
    first = torch.tensor(rr.score(QUERY, PASSAGES, return_margin=True))
    assert float((first - reference).abs().max()) < 0.05
    # re-pooling from compact entries: a call at ratio 4 pools the decoded ratio-1 vectors
    r4 = torch.tensor(rr.score(QUERY, PASSAGES, ratio=4, return_margin=True))
    r4_exact = torch.tensor(exact.score(QUERY, PASSAGES, ratio=4, return_margin=True))
    assert float((r4 - r4_exact).abs().max()) < 0.05
    again = Reranker(backend, store=url)  # nothing given: the store's settings
    assert (again.storage, again.base_ratio, again.settings_source) == ("int8", 1, "store")
    monkeypatch.setattr(again.backend, "encode", _no_encoder)
    assert again.score(QUERY, PASSAGES, return_margin=True) == first.tolist()
    for r in (rr, again, exact):
        r.close()


def test_a_miss_scores_exactly_as_the_hit_it_becomes(backend, url):
    rr = Reranker(backend, store=url, storage="int8")
    first = rr.score(QUERY, PASSAGES, return_margin=True)  # every passage encoded now
    assert rr.score(QUERY, PASSAGES, return_margin=True) == first  # every passage read back
    rr.close()


def test_encode_trains_the_codebook_first_and_stores_every_passage_with_it(backend, url):
    rr = Reranker(backend, store=url, storage="res4")
    rr.codebook_passages = 5  # (256 by default) the first 5 passages train it, then all 6 are stored with it
    assert rr.codebook is None
    rr.encode(PASSAGES)
    book = rr.codebook
    assert book is not None and book.bits == 4
    assert _stored_storages(rr) == ["res4"] * len(PASSAGES)
    assert rr.store.get_meta(rr.namespace, CODEBOOK_RECORD) == book.to_bytes()
    first = rr.score(QUERY, PASSAGES, return_margin=True)
    other = Reranker(backend, store=url)
    assert other.storage == "res4" and other.codebook.id == book.id
    assert other.score(QUERY, PASSAGES, return_margin=True) == first
    rr.close()
    other.close()


def test_a_scoring_reranker_stores_int8_until_it_has_seen_enough_passages(backend):
    rr = Reranker(backend, store=MemoryStore(), storage="res2")
    rr.codebook_passages = 4
    rr.score(QUERY, PASSAGES[:3])  # fewer than 4 passages seen: no codebook, exact-ish int8 entries
    assert rr.codebook is None
    assert [e.storage for e in rr.store.get_many(rr.namespace, [passage_key(p) for p in PASSAGES[:3]])] == ["int8"] * 3
    rr.score(QUERY, PASSAGES[3:])  # the 4th passage: the codebook is trained from the 6 seen
    assert rr.codebook is not None
    assert [e.storage for e in rr.store.get_many(rr.namespace, [passage_key(p) for p in PASSAGES[3:]])] == ["res2"] * 3
    assert all(e is not None for e in rr.store.get_many(rr.namespace, [passage_key(p) for p in PASSAGES]))
    rr.close()


def test_a_damaged_codebook_is_trained_again_and_its_entries_recomputed(backend, url, monkeypatch):
    rr = Reranker(backend, store=url, storage="res4")
    rr.codebook_passages = 5
    rr.encode(PASSAGES)
    before = rr.score(QUERY, PASSAGES, return_margin=True)
    old = rr.codebook
    blob = bytearray(rr.store.get_meta(rr.namespace, CODEBOOK_RECORD))
    blob[-1] ^= 0xFF
    rr.store.delete_meta(rr.namespace, CODEBOOK_RECORD)
    rr.store.put_meta_if_absent(rr.namespace, CODEBOOK_RECORD, bytes(blob))
    monkeypatch.setattr(quantize, "_REGISTRY", {})  # a fresh process: the codebook is known only from the store
    fresh = Reranker(backend, store=url)
    assert fresh.codebook is None  # detected and dropped
    after = fresh.score(QUERY, PASSAGES, return_margin=True)  # misses: recomputed, never decoded wrongly
    assert fresh.counters["store_misses"] == len(PASSAGES)
    assert len(after) == len(before)
    fresh.codebook_passages = 5
    fresh.store.clear(fresh.namespace)  # its int8 entries would be kept; train on passages encoded anew
    fresh.encode(PASSAGES)
    assert fresh.codebook is not None and fresh.codebook.id != old.id
    rr.close()
    fresh.close()


def test_a_setting_that_contradicts_the_store_is_refused(backend, url):
    Reranker(backend, store=url, storage="int8", base_ratio=2).encode(PASSAGES[:1])
    with pytest.raises(StoreSettingsError, match="storage='int8' \\(asked: 'float32'\\)") as err:
        Reranker(backend, store=url, storage="float32")
    assert isinstance(err.value, KalmError)
    ok = Reranker(backend, store=url, base_ratio=2)  # agreeing options are fine
    assert ok.storage == "int8" and ok.ratio == 4
    ok.close()


def test_storage_and_storage_dtype(backend):
    assert Reranker(backend, storage_dtype="bfloat16").storage == "bfloat16"
    with pytest.raises(InvalidInputError, match="disagree"):
        Reranker(backend, storage="int8", storage_dtype="float32")
    with pytest.raises(InvalidInputError, match="storage must be one of"):
        Reranker(backend, storage="res3")


def test_defaults_kalm_mini_compact_official_exact():
    assert family_defaults("kalm-mini") == COMPACT_DEFAULTS
    assert family_defaults("t5gemma2") == LEGACY_DEFAULTS == store_settings.VectorSettings(1, "float32", 1024)


def test_a_store_written_before_settings_were_recorded_keeps_its_settings(backend, url, monkeypatch):
    old = Reranker(backend, store=url, base_ratio=1, storage="float32")
    old.encode(PASSAGES)
    old.store.delete_meta(old.model_scope, store_settings.SETTINGS_RECORD)  # as an older kalm-rag left it
    monkeypatch.setattr(store_settings, "family_defaults", lambda family: COMPACT_DEFAULTS)
    adopted = Reranker(backend, store=url)
    assert (adopted.storage, adopted.base_ratio, adopted.settings_source) == ("float32", 1, "legacy store")
    assert adopted.namespace == old.namespace
    fresh = Reranker(backend, store=MemoryStore())
    assert (fresh.storage, fresh.base_ratio) == ("res4", 4)
    old.close()
    adopted.close()


def test_the_store_url_names_the_storage(backend, tmp_path):
    rr = Reranker(backend, store=f"sqlite:///{tmp_path}/p.db?storage=int8")
    assert rr.storage == "int8" and rr.store.storage == "int8"
    rr.close()
    with pytest.raises(KalmError, match="storage must be one of"):
        Reranker(backend, store="memory://?storage=int4")


def test_serve_warns_at_start_up_when_the_store_holds_nothing_for_its_model(tiny_checkpoint, tmp_path, caplog):
    pytest.importorskip("fastapi")
    import logging

    from kalm_rag.serve.app import ServeConfig

    config = ServeConfig(model=str(tiny_checkpoint), store=f"sqlite:///{tmp_path}/p.db", storage="int8")
    with caplog.at_level(logging.WARNING, logger="kalm_rag.serve.app"):
        rr = config.load_reranker()
    assert "holds no passage vectors of this model" in caplog.text
    assert rr.storage == "int8"
    rr.encode(PASSAGES[:2])
    rr.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kalm_rag.serve.app"):
        rr = ServeConfig(model=str(tiny_checkpoint), store=config.store).load_reranker()  # no --storage
    assert "holds no passage vectors" not in caplog.text
    assert (rr.storage, rr.settings_source) == ("int8", "store")  # adopted from what was indexed
    rr.close()


def test_the_default_cascade_runs_on_a_store_at_base_ratio_4(backend):
    """The paper's cascade (r=32, then r=2) cannot read windows stored at base ratio 4: by default its fine stage
    runs at the next multiple of the base ratio; asked for explicitly, r=2 is refused with the reason."""
    rr = Reranker(backend, store=MemoryStore(), base_ratio=4, storage="int8")
    ranked = rr.rerank_cascade(QUERY, PASSAGES)
    assert sorted(r.index for r in ranked) == list(range(len(PASSAGES)))
    assert {r.ratio for r in ranked} == {4}  # 6 passages: every one reaches the fine stage
    assert [r.index for r in ranked] == [r.index for r in rr.rerank(QUERY, PASSAGES, ratio=4)]
    with pytest.raises(InvalidInputError, match="base_ratio"):
        rr.rerank_cascade(QUERY, PASSAGES, stages=[(32, 10), (2, 4)])
    exact = Reranker(backend, store=MemoryStore())  # official checkpoints: base ratio 1, the paper's stages as given
    assert {r.ratio for r in exact.rerank_cascade(QUERY, PASSAGES)} == {2}
    rr.close()
    exact.close()
