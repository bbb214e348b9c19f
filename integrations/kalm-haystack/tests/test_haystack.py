"""Haystack adapter: KaLMRanker after an InMemoryBM25Retriever, KaLMPassageEncoder before a DocumentWriter."""

from __future__ import annotations

import copy

import pytest
from haystack import Document, Pipeline
from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
from haystack.components.writers import DocumentWriter
from haystack.core.errors import SerializationError
from haystack.document_stores.in_memory import InMemoryDocumentStore
from haystack.utils import ComponentDevice

from haystack_integrations.components.rankers.kalm import KaLMPassageEncoder, KaLMRanker
from kalm_rag.adapters import shared_store
from tests.integrations.helpers import (
    CORPUS,
    QUERY,
    assert_same_ranking,
    engine_ranking,
    forbid_encoder,
    record_scoring_threads,
)


def corpus_documents() -> list[Document]:
    return [Document(id=doc_id, content=text, meta=dict(meta)) for doc_id, text, meta in CORPUS]


def indexing_pipeline(document_store, encoder: KaLMPassageEncoder) -> Pipeline:
    pipeline = Pipeline()
    pipeline.add_component("encoder", encoder)
    pipeline.add_component("writer", DocumentWriter(document_store=document_store))
    pipeline.connect("encoder.documents", "writer.documents")
    return pipeline


def query_pipeline(document_store, ranker: KaLMRanker) -> Pipeline:
    pipeline = Pipeline()
    pipeline.add_component("retriever", InMemoryBM25Retriever(document_store=document_store, top_k=len(CORPUS)))
    pipeline.add_component("ranker", ranker)
    pipeline.connect("retriever.documents", "ranker.documents")
    return pipeline


def query_inputs(query: str = QUERY) -> dict:
    return {"retriever": {"query": query}, "ranker": {"query": query}}


@pytest.fixture
def indexed(kalm_checkpoint, store):
    """A document store filled through KaLMPassageEncoder; returns (document store, the model's reranker)."""
    document_store = InMemoryDocumentStore()
    encoder = KaLMPassageEncoder(model=str(kalm_checkpoint), store=store)
    result = indexing_pipeline(document_store, encoder).run({"encoder": {"documents": corpus_documents()}})
    assert result["writer"]["documents_written"] == len(CORPUS)
    reranker = encoder.get_reranker()
    assert reranker.counters["encoded_passages"] == len(CORPUS)
    return document_store, reranker


def check_against_engine(reranker, result, top_k) -> None:
    retrieved = result["retriever"]["documents"]
    expected = engine_ranking(reranker, QUERY, [d.content for d in retrieved], top_k=top_k)
    got = [(d.content, d.score) for d in result["ranker"]["documents"]]
    assert_same_ranking(got, expected)


def test_light_init_and_idempotent_warm_up(kalm_checkpoint, store, tmp_path):
    KaLMRanker(model=tmp_path / "not-a-checkpoint")  # nothing is loaded in __init__
    ranker = KaLMRanker(model=str(kalm_checkpoint), store=store)
    ranker.warm_up()
    first = ranker.get_reranker()
    ranker.warm_up()
    assert ranker.get_reranker() is first
    # the encoder on the same model and store shares the loaded model
    encoder = KaLMPassageEncoder(model=str(kalm_checkpoint), store=store)
    encoder.warm_up()
    assert encoder.get_reranker() is first


def test_pipeline_run_matches_the_engine_and_hits_the_cache(kalm_checkpoint, store, indexed):
    document_store, reranker = indexed
    forbid_encoder(reranker)
    ranker = KaLMRanker(model=str(kalm_checkpoint), store=store, top_k=3)
    result = query_pipeline(document_store, ranker).run(query_inputs(), include_outputs_from={"retriever"})
    assert len(result["ranker"]["documents"]) == 3
    check_against_engine(reranker, result, top_k=3)
    assert ranker.get_reranker() is reranker  # same model + store: one model in memory
    assert reranker.counters["encoded_passages"] == len(CORPUS)


async def test_pipeline_run_async_matches_and_runs_off_the_event_loop(kalm_checkpoint, store, indexed):
    document_store, reranker = indexed
    forbid_encoder(reranker)
    threads = record_scoring_threads(reranker)
    ranker = KaLMRanker(model=str(kalm_checkpoint), store=store, top_k=4)
    result = await query_pipeline(document_store, ranker).run_async(query_inputs(), include_outputs_from={"retriever"})
    # the decoder ran on the reranker's own worker, not the loop's thread nor a default-executor thread
    assert threads and all(name.startswith("kalm-rag") for name in threads)
    assert len(result["ranker"]["documents"]) == 4
    check_against_engine(reranker, result, top_k=4)


async def test_run_and_run_async_agree(reranker, kalm_checkpoint, store):
    ranker = KaLMRanker(model=str(kalm_checkpoint), store=store, top_k=5)
    sync = ranker.run(query=QUERY, documents=corpus_documents())["documents"]
    asynchronous = (await ranker.run_async(query=QUERY, documents=corpus_documents()))["documents"]
    assert [(d.id, d.score) for d in sync] == [(d.id, d.score) for d in asynchronous]
    encoded = await KaLMPassageEncoder(model=str(kalm_checkpoint), store=store).run_async(documents=corpus_documents())
    assert [d.id for d in encoded["documents"]] == [doc_id for doc_id, _, _ in CORPUS]


def test_yaml_round_trip(kalm_checkpoint):
    url = "memory://"
    pipeline = query_pipeline(
        InMemoryDocumentStore(),
        KaLMRanker(
            model=str(kalm_checkpoint), store=url, top_k=2, score_threshold=0.0, instruction="Find it.", ratio=8
        ),
    )
    text = pipeline.dumps()
    assert "haystack_integrations.components.rankers.kalm.ranker.KaLMRanker" in text
    loaded = Pipeline.loads(text)  # no allowed_modules=, no unsafe=: haystack_integrations is trusted
    assert loaded.to_dict() == pipeline.to_dict()
    ranker = loaded.get_component("ranker")
    assert (ranker.model, ranker.store, ranker.top_k, ranker.score_threshold, ranker.instruction, ranker.ratio) == (
        str(kalm_checkpoint),
        url,
        2,
        0.0,
        "Find it.",
        8,
    )

    indexing = indexing_pipeline(InMemoryDocumentStore(), KaLMPassageEncoder(model=str(kalm_checkpoint), store=url))
    reloaded = Pipeline.loads(indexing.dumps())
    assert reloaded.to_dict() == indexing.to_dict()
    # a YAML-built encoder and ranker with the same URL share one store (hence the cache) in this process
    assert reloaded.get_component("encoder").get_reranker().store is ranker.get_reranker().store


def test_device_and_store_serialization(kalm_checkpoint, store):
    ranker = KaLMRanker(model=str(kalm_checkpoint), store="memory://", device=ComponentDevice.from_str("cpu"))
    data = ranker.to_dict()
    assert data["init_parameters"]["device"] == ComponentDevice.from_str("cpu").to_dict()
    restored = KaLMRanker.from_dict(data)
    assert restored.device == ComponentDevice.from_str("cpu")
    assert KaLMRanker.from_dict(data).to_dict() == data
    # a store object opened from a URL serializes as that URL; any other store object cannot be serialized
    assert KaLMRanker(store=shared_store("memory://")).to_dict()["init_parameters"]["store"] == "memory://"
    with pytest.raises(SerializationError, match="pass the store as a URL"):
        KaLMRanker(store=store).to_dict()


def test_dedup_by_id_copies_and_never_mutates(reranker, kalm_checkpoint, store):
    docs = corpus_documents()
    dup_low = Document(id="paris", content=CORPUS[0][1], score=0.1)
    dup_high = Document(id="paris", content=CORPUS[0][1], score=0.9, meta={"kept": True})
    inputs = [dup_low, *docs[1:], dup_high]
    before = copy.deepcopy(inputs)
    out = KaLMRanker(model=str(kalm_checkpoint), store=store).run(query=QUERY, documents=inputs)["documents"]
    assert inputs == before
    assert len(out) == len(CORPUS) and len({d.id for d in out}) == len(CORPUS)
    assert next(d for d in out if d.id == "paris").meta == {"kept": True}  # the higher-scored duplicate
    assert not any(o is i for o in out for i in inputs)
    expected = engine_ranking(reranker, QUERY, [text for _, text, _ in CORPUS])
    assert_same_ranking([(d.content, d.score) for d in out], expected)


def test_top_k_threshold_and_documents_without_content(kalm_checkpoint, store):
    ranker = KaLMRanker(model=str(kalm_checkpoint), store=store, top_k=3)
    docs = [*corpus_documents(), Document(id="no-content", content=None)]
    assert len(ranker.run(query=QUERY, documents=docs)["documents"]) == 3
    everything = ranker.run(query=QUERY, documents=docs, top_k=100)["documents"]
    assert everything[-1].id == "no-content" and everything[-1].score == 0.0
    threshold = everything[2].score
    kept = ranker.run(query=QUERY, documents=docs, top_k=100, score_threshold=threshold)["documents"]
    assert [d.id for d in kept] == [d.id for d in everything if d.score >= threshold]
    assert ranker.run(query=QUERY, documents=[])["documents"] == []
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        ranker.run(query=QUERY, documents=docs, top_k=0)
    with pytest.raises(ValueError, match="top_k must be an int >= 1"):
        KaLMRanker(top_k=0)
    with pytest.raises(ValueError, match="ratio must be an int in 1..32"):
        KaLMRanker(ratio=33)


def test_encoder_outputs_documents_unchanged(reranker, kalm_checkpoint, store):
    docs = [*corpus_documents(), Document(id="blob-only", content=None)]
    before = copy.deepcopy(docs)
    out = KaLMPassageEncoder(model=str(kalm_checkpoint), store=store).run(documents=docs)["documents"]
    assert out == before and all(a is b for a, b in zip(out, docs, strict=True))
    assert store.stats()["entries"] == len(CORPUS)  # the document without content is skipped


@pytest.mark.parametrize("cls", [KaLMRanker, KaLMPassageEncoder])
def test_store_credentials_go_in_a_secret_never_into_the_saved_pipeline(cls, kalm_checkpoint, tmp_path, monkeypatch):
    # issue #23, item 14: to_dict once wrote the store URL verbatim, password included
    import json

    from haystack.utils import Secret

    secret_url = "redis://:hunter2@localhost:6379/0"
    with pytest.raises(SerializationError, match="holds credentials") as err:
        cls(model=str(kalm_checkpoint), store=secret_url).to_dict()
    assert "hunter2" not in str(err.value) and "Secret.from_env_var" in str(err.value)

    monkeypatch.setenv("KALM_TEST_STORE", secret_url)
    component = cls(model=str(kalm_checkpoint), store=Secret.from_env_var("KALM_TEST_STORE"))
    data = component.to_dict()
    assert "hunter2" not in json.dumps(data)
    assert data["init_parameters"]["store"] == {"type": "env_var", "env_vars": ["KALM_TEST_STORE"], "strict": True}
    restored = cls.from_dict(data)
    assert isinstance(restored.store, Secret) and restored.store.resolve_value() == secret_url
    assert restored.to_dict() == data
    with pytest.raises(SerializationError, match="token Secret"):
        cls(model=str(kalm_checkpoint), store=Secret.from_token(secret_url)).to_dict()

    # a URL without credentials stays a plain string, and what earlier versions wrote still loads
    url = f"sqlite:///{tmp_path / 'p.db'}"
    plain = cls(model=str(kalm_checkpoint), store=url).to_dict()
    assert plain["init_parameters"]["store"] == url and cls.from_dict(plain).store == url
