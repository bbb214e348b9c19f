"""LangChain adapter: KaLMRerank in a ContextualCompressionRetriever over a real InMemoryVectorStore."""

from __future__ import annotations

import copy

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import BaseDocumentCompressor, BaseDocumentTransformer, Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

from kalm_rag import InvalidInputError
from langchain_kalm import KaLMPassageEncoder, KaLMRerank
from tests.integrations.helpers import (
    CORPUS,
    QUERY,
    assert_same_ranking,
    engine_ranking,
    forbid_encoder,
    record_scoring_threads,
)


def corpus_documents() -> list[Document]:
    return [Document(page_content=text, id=doc_id, metadata=dict(meta)) for doc_id, text, meta in CORPUS]


@pytest.fixture
def vector_store(reranker):
    """A vector store filled through KaLMPassageEncoder, so every passage is pre-encoded."""
    vs = InMemoryVectorStore(DeterministicFakeEmbedding(size=32))
    encoder = KaLMPassageEncoder(reranker=reranker)
    vs.add_documents(list(encoder.transform_documents(corpus_documents())))
    assert reranker.counters["encoded_passages"] == len(CORPUS)
    return vs


def make_retriever(vs, compressor):
    base = vs.as_retriever(search_kwargs={"k": len(CORPUS)})
    return ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base), base


def test_components_are_native_langchain_types():
    assert issubclass(KaLMRerank, BaseDocumentCompressor)
    assert issubclass(KaLMPassageEncoder, BaseDocumentTransformer)
    assert KaLMRerank().top_n == 3  # constructing loads nothing, even for the default model


def test_retriever_matches_the_engine_and_hits_the_cache(vector_store, reranker):
    forbid_encoder(reranker)
    retriever, base = make_retriever(vector_store, KaLMRerank(reranker=reranker, top_n=3))
    retrieved = base.invoke(QUERY)
    docs = retriever.invoke(QUERY)

    expected = engine_ranking(reranker, QUERY, [d.page_content for d in retrieved], top_k=3)
    assert_same_ranking([(d.page_content, d.metadata["relevance_score"]) for d in docs], expected)
    assert reranker.counters["encoded_passages"] == len(CORPUS)  # nothing re-encoded at query time
    by_text = {text: doc_id for doc_id, text, _ in CORPUS}
    assert [d.id for d in docs] == [by_text[d.page_content] for d in docs]  # ids kept
    assert all("topic" in d.metadata for d in docs)  # metadata kept


async def test_async_retriever_matches_sync_and_runs_off_the_event_loop(vector_store, reranker):
    retriever, _ = make_retriever(vector_store, KaLMRerank(reranker=reranker, top_n=4))
    sync_docs = retriever.invoke(QUERY)
    threads = record_scoring_threads(reranker)
    async_docs = await retriever.ainvoke(QUERY)
    assert [(d.id, d.metadata["relevance_score"]) for d in async_docs] == [
        (d.id, d.metadata["relevance_score"]) for d in sync_docs
    ]
    # the decoder ran on the reranker's own worker, not the loop's thread nor a default-executor thread
    assert threads and all(name.startswith("kalm-rag") for name in threads)


async def test_async_indexing_encodes_off_the_event_loop(reranker):
    encoder = KaLMPassageEncoder(reranker=reranker)
    docs = corpus_documents()
    out = await encoder.atransform_documents(docs)
    assert list(out) == docs and all(a is b for a, b in zip(out, docs, strict=True))  # unchanged, same objects
    assert reranker.counters["encoded_passages"] == len(docs)


def test_compressor_returns_copies_and_never_mutates_the_input(reranker):
    docs = corpus_documents()
    before = copy.deepcopy(docs)
    out = KaLMRerank(reranker=reranker, top_n=None).compress_documents(docs, QUERY)
    assert docs == before
    assert all("relevance_score" not in d.metadata for d in docs)
    assert len(out) == len(docs)
    assert not any(o is d for o in out for d in docs)
    assert [o.metadata["relevance_score"] for o in out] == sorted(
        (o.metadata["relevance_score"] for o in out), reverse=True
    )


def test_threshold_instruction_ratio_and_empty_content(reranker):
    docs = corpus_documents() + [Document(page_content="   ", id="blank")]
    texts = [d.page_content for d in docs[:-1]]
    scores = reranker.score(QUERY, texts, instruction="Find the city.", ratio=2)
    threshold = sorted(scores)[len(scores) // 2]

    out = KaLMRerank(
        reranker=reranker, top_n=None, score_threshold=threshold, instruction="Find the city.", ratio=2
    ).compress_documents(docs, QUERY)
    assert sorted(d.metadata["relevance_score"] for d in out) == pytest.approx(
        sorted(s for s in scores if s >= threshold), abs=1e-6
    )

    everything = KaLMRerank(reranker=reranker, top_n=None).compress_documents(docs, QUERY)
    assert everything[-1].id == "blank" and everything[-1].metadata["relevance_score"] == 0.0
    assert KaLMRerank(reranker=reranker).compress_documents([], QUERY) == []


def test_model_and_store_settings_load_a_shared_reranker(kalm_checkpoint, store):
    compressor = KaLMRerank(model=str(kalm_checkpoint), store=store)
    encoder = KaLMPassageEncoder(model=str(kalm_checkpoint), store=store)
    assert compressor.get_reranker() is encoder.get_reranker()  # one model in memory for both
    assert compressor.get_reranker().store is store
    encoder.transform_documents(corpus_documents())
    rr = compressor.get_reranker()
    forbid_encoder(rr)
    assert len(compressor.compress_documents(corpus_documents(), QUERY)) == 3


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_n=0), "top_n must be an int >= 1"),
        (dict(ratio=64), "ratio must be an int in 1..32"),
        (dict(instruction=""), "instruction is empty"),
        (dict(score_threshold="high"), "score_threshold"),
        (dict(batch_size=0), "batch_size must be an int >= 1"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KaLMRerank(**kwargs)


def test_reranker_and_model_settings_are_mutually_exclusive(reranker):
    with pytest.raises(ValueError, match="either reranker= or model=, store="):
        KaLMRerank(reranker=reranker, model="x", store="memory://")
    with pytest.raises(ValueError, match="either reranker= or"):
        KaLMPassageEncoder(reranker=reranker, batch_size=8)


def test_an_empty_query_is_an_engine_error(reranker):
    with pytest.raises(InvalidInputError, match="query is empty"):
        KaLMRerank(reranker=reranker).compress_documents(corpus_documents(), "  ")


@pytest.mark.parametrize("cls", [KaLMRerank, KaLMPassageEncoder])
@pytest.mark.parametrize("field, value", [("batch_size", "many"), ("device", 3)])
def test_a_wrongly_typed_field_is_an_invalid_input_error_with_pydantics_message(cls, field, value):
    # issue #23, item 15: every deliberate refusal is a KalmError, not pydantic's ValidationError
    from pydantic import ValidationError

    from kalm_rag import KalmError

    with pytest.raises(InvalidInputError, match=f"validation error for {cls.__name__}\n{field}\n") as err:
        cls(**{field: value})
    assert isinstance(err.value, KalmError) and isinstance(err.value, ValueError)
    assert isinstance(err.value.__cause__, ValidationError)
