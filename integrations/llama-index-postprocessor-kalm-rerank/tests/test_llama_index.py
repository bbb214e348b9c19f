"""LlamaIndex adapter: KaLMRerank in a real VectorStoreIndex query engine (MockEmbedding, MockLLM)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from llama_index.core import Settings, VectorStoreIndex
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode, TransformComponent

from llama_index.postprocessor.kalm_rerank import KaLMPassageEncoder, KaLMRerank
from tests.integrations.helpers import (
    CORPUS,
    QUERY,
    assert_same_ranking,
    engine_ranking,
    forbid_encoder,
    record_scoring_threads,
)


class RerankEvents(BaseEventHandler):
    """Collects the rerank events seen on the root instrumentation dispatcher."""

    events: list[Any] = []

    @classmethod
    def class_name(cls) -> str:
        return "RerankEvents"

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, (ReRankStartEvent, ReRankEndEvent)):
            self.events.append(event)


@pytest.fixture
def rerank_events():
    handler = RerankEvents(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler.events
    root.event_handlers.remove(handler)


def corpus_nodes() -> list[TextNode]:
    # metadata is present but must not enter the passage text (MetadataMode.NONE)
    return [TextNode(text=text, id_=node_id, metadata=dict(meta)) for node_id, text, meta in CORPUS]


@pytest.fixture
def index(reranker):
    """An index whose nodes went through an IngestionPipeline with KaLMPassageEncoder."""
    pipeline = IngestionPipeline(transformations=[KaLMPassageEncoder(reranker=reranker)])
    nodes = pipeline.run(nodes=corpus_nodes())
    assert [n.id_ for n in nodes] == [node_id for node_id, _, _ in CORPUS]
    assert reranker.counters["encoded_passages"] == len(CORPUS)
    return VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))


@pytest.fixture
def debug():
    """A LlamaDebugHandler on the global callback manager (what query engines hand to postprocessors)."""
    handler = LlamaDebugHandler(print_trace_on_end=False)
    previous = Settings._callback_manager
    Settings.callback_manager = CallbackManager([handler])
    yield handler
    Settings._callback_manager = previous


def query_engine(index, postprocessor):
    return index.as_query_engine(llm=MockLLM(), similarity_top_k=len(CORPUS), node_postprocessors=[postprocessor])


def check_result(reranker, response, events, debug, top_n) -> None:
    """The engine's ranking of the nodes the postprocessor received, and every event fired once."""
    start, end = events
    assert isinstance(start, ReRankStartEvent) and isinstance(end, ReRankEndEvent)
    assert start.top_n == top_n and start.query.query_str == QUERY and len(start.nodes) == len(CORPUS)
    texts = [n.node.get_content() for n in start.nodes]
    expected = engine_ranking(reranker, QUERY, texts, top_k=top_n)
    got = [(n.node.get_content(), n.score) for n in response.source_nodes]
    assert_same_ranking(got, expected)
    assert [(n.node.node_id, n.score) for n in end.nodes] == [(n.node.node_id, n.score) for n in response.source_nodes]

    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 1
    assert pairs[0][0].payload[EventPayload.QUERY_STR] == QUERY
    assert pairs[0][0].payload[EventPayload.TOP_K] == top_n
    assert [n.node.node_id for n in pairs[0][1].payload[EventPayload.NODES]] == [
        n.node.node_id for n in response.source_nodes
    ]


def test_components_are_native_llama_index_types():
    assert issubclass(KaLMRerank, BaseNodePostprocessor)
    assert issubclass(KaLMPassageEncoder, TransformComponent)
    assert KaLMRerank.class_name() == "KaLMRerank"
    assert KaLMRerank().to_dict()["store"] == "memory://"  # serializable; constructing loads nothing


def test_query_engine_matches_the_engine_and_fires_events(index, reranker, rerank_events, debug):
    forbid_encoder(reranker)
    response = query_engine(index, KaLMRerank(reranker=reranker, top_n=3)).query(QUERY)
    assert len(response.source_nodes) == 3
    check_result(reranker, response, rerank_events, debug, top_n=3)
    assert reranker.counters["encoded_passages"] == len(CORPUS)  # all cache hits


async def test_async_query_engine_matches_and_runs_off_the_event_loop(index, reranker, rerank_events, debug):
    forbid_encoder(reranker)
    threads = record_scoring_threads(reranker)
    response = await query_engine(index, KaLMRerank(reranker=reranker, top_n=4)).aquery(QUERY)
    # the decoder ran on the reranker's own worker, not the loop's thread nor a default-executor thread
    assert threads and all(name.startswith("kalm-rag") for name in threads)
    assert len(response.source_nodes) == 4
    check_result(reranker, response, rerank_events, debug, top_n=4)


async def test_async_ingestion_encodes_off_the_event_loop(reranker):
    nodes = await IngestionPipeline(transformations=[KaLMPassageEncoder(reranker=reranker)]).arun(nodes=corpus_nodes())
    assert [n.get_content() for n in nodes] == [text for _, text, _ in CORPUS]
    assert reranker.counters["encoded_passages"] == len(CORPUS)


def test_new_node_objects_and_keep_retrieval_score_on_copies(reranker):
    inputs = [NodeWithScore(node=n, score=0.1 * i) for i, n in enumerate(corpus_nodes())]
    before = copy.deepcopy(inputs)
    out = KaLMRerank(reranker=reranker, top_n=5, keep_retrieval_score=True).postprocess_nodes(inputs, query_str=QUERY)
    assert len(out) == 5
    assert not any(o is i for o in out for i in inputs)
    assert [(i.node.node_id, i.score, i.node.metadata) for i in inputs] == [
        (b.node.node_id, b.score, b.node.metadata) for b in before
    ]
    retrieval = {i.node.node_id: i.score for i in inputs}
    assert all(o.node.metadata["retrieval_score"] == retrieval[o.node.node_id] for o in out)

    plain = KaLMRerank(reranker=reranker, top_n=5).postprocess_nodes(inputs, query_bundle=QueryBundle(QUERY))
    assert [o.node.node_id for o in plain] == [o.node.node_id for o in out]
    assert all("retrieval_score" not in o.node.metadata for o in plain)


def test_instruction_ratio_and_node_without_text(reranker):
    inputs = [NodeWithScore(node=n) for n in corpus_nodes()] + [NodeWithScore(node=TextNode(text="", id_="empty"))]
    out = KaLMRerank(reranker=reranker, top_n=len(inputs), instruction="Find the city.", ratio=8).postprocess_nodes(
        inputs, query_str=QUERY
    )
    expected = reranker.rerank(QUERY, [text for _, text, _ in CORPUS], instruction="Find the city.", ratio=8)
    assert [o.score for o in out[:-1]] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert out[-1].node.node_id == "empty" and out[-1].score == 0.0


def test_no_nodes_and_no_query(reranker, rerank_events):
    assert KaLMRerank(reranker=reranker).postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(ValueError, match="needs a query"):
        KaLMRerank(reranker=reranker).postprocess_nodes([NodeWithScore(node=corpus_nodes()[0])])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_n=0), "top_n must be an int >= 1"),
        (dict(top_n=None), "top_n"),
        (dict(ratio=0), "ratio must be an int in 1..32"),
        (dict(instruction="  "), "instruction is empty"),
    ],
)
def test_bad_options_are_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KaLMRerank(**kwargs)


def test_reranker_and_model_settings_are_mutually_exclusive(reranker, kalm_checkpoint):
    with pytest.raises(ValueError, match="either reranker= or model="):
        KaLMRerank(reranker=reranker, model=str(kalm_checkpoint))


@pytest.mark.parametrize("cls", [KaLMRerank, KaLMPassageEncoder])
@pytest.mark.parametrize("field, value", [("batch_size", "many"), ("device", 3)])
def test_a_wrongly_typed_field_is_an_invalid_input_error_with_pydantics_message(cls, field, value):
    # issue #23, item 15: every deliberate refusal is a KalmError, not pydantic's ValidationError
    from pydantic import ValidationError

    from kalm_rag import InvalidInputError, KalmError

    with pytest.raises(InvalidInputError, match=f"validation error for {cls.__name__}\n{field}\n") as err:
        cls(**{field: value})
    assert isinstance(err.value, KalmError) and isinstance(err.value, ValueError)
    assert isinstance(err.value.__cause__, ValidationError)
