"""One store for all three frameworks: what one framework's indexing piece encodes, every ranker finds.

Also the framework-free layer the adapters share (``kalm_rag.adapters``): stores by URL, models by
configuration, and the ranking rule.
"""

from __future__ import annotations

import gc

import pytest
from haystack import Document as HaystackDocument
from langchain_core.documents import Document as LangChainDocument
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.schema import NodeWithScore, TextNode

from haystack_integrations.components.rankers.kalm import KaLMPassageEncoder as HaystackEncoder
from haystack_integrations.components.rankers.kalm import KaLMRanker
from kalm_rag import Reranker, adapters
from kalm_rag.store import MemoryStore
from langchain_kalm import KaLMPassageEncoder as LangChainEncoder
from langchain_kalm import KaLMRerank as LangChainRerank
from llama_index.postprocessor.kalm_rerank import KaLMPassageEncoder as LlamaIndexEncoder
from llama_index.postprocessor.kalm_rerank import KaLMRerank as LlamaIndexRerank
from tests.integrations.helpers import CORPUS, QUERY, engine_ranking, forbid_encoder

TOP = 5


def encode_with_langchain(checkpoint, store) -> Reranker:
    rr = Reranker.from_pretrained(checkpoint, store=store)
    docs = [LangChainDocument(page_content=text, id=i, metadata=dict(m)) for i, text, m in CORPUS]
    LangChainEncoder(reranker=rr).transform_documents(docs)
    return rr


def encode_with_llama_index(checkpoint, store) -> Reranker:
    rr = Reranker.from_pretrained(checkpoint, store=store)
    # metadata on the nodes: it must stay out of the passage text, or the other frameworks would miss
    nodes = [TextNode(text=text, id_=i, metadata=dict(m)) for i, text, m in CORPUS]
    IngestionPipeline(transformations=[LlamaIndexEncoder(reranker=rr)]).run(nodes=nodes)
    return rr


def encode_with_haystack(checkpoint, store) -> Reranker:
    encoder = HaystackEncoder(model=str(checkpoint), store=store)
    encoder.run(documents=[HaystackDocument(id=i, content=text, meta=dict(m)) for i, text, m in CORPUS])
    return encoder.get_reranker()


def rank_with_langchain(checkpoint, store) -> tuple[Reranker, list[tuple[str, float]]]:
    rr = Reranker.from_pretrained(checkpoint, store=store)
    forbid_encoder(rr)
    docs = [LangChainDocument(page_content=text, id=i, metadata=dict(m)) for i, text, m in CORPUS]
    out = LangChainRerank(reranker=rr, top_n=TOP).compress_documents(docs, QUERY)
    return rr, [(d.page_content, d.metadata["relevance_score"]) for d in out]


def rank_with_llama_index(checkpoint, store) -> tuple[Reranker, list[tuple[str, float]]]:
    rr = Reranker.from_pretrained(checkpoint, store=store)
    forbid_encoder(rr)
    nodes = [NodeWithScore(node=TextNode(text=text, id_=i, metadata=dict(m))) for i, text, m in CORPUS]
    out = LlamaIndexRerank(reranker=rr, top_n=TOP).postprocess_nodes(nodes, query_str=QUERY)
    return rr, [(n.node.get_content(), n.score) for n in out]


def rank_with_haystack(checkpoint, store) -> tuple[Reranker, list[tuple[str, float]]]:
    ranker = KaLMRanker(model=str(checkpoint), store=store, top_k=TOP)
    rr = ranker.get_reranker()
    forbid_encoder(rr)
    docs = [HaystackDocument(id=i, content=text, meta=dict(m)) for i, text, m in CORPUS]
    return rr, [(d.content, d.score) for d in ranker.run(query=QUERY, documents=docs)["documents"]]


ENCODERS = {
    "langchain": encode_with_langchain,
    "llama_index": encode_with_llama_index,
    "haystack": encode_with_haystack,
}
RANKERS = {"langchain": rank_with_langchain, "llama_index": rank_with_llama_index, "haystack": rank_with_haystack}


@pytest.mark.parametrize("indexed_by", sorted(ENCODERS))
def test_documents_encoded_by_one_framework_are_cache_hits_in_every_other(kalm_checkpoint, indexed_by):
    store = MemoryStore()
    encoding_rr = ENCODERS[indexed_by](kalm_checkpoint, store)
    assert encoding_rr.counters["encoded_passages"] == len(CORPUS)
    assert store.stats()["entries"] == len(CORPUS)

    rankings = {}
    for name, rank in RANKERS.items():
        rr, rankings[name] = rank(kalm_checkpoint, store)
        # zero encoder calls (forbid_encoder would have raised), and nothing new in the store
        assert rr.counters["encoded_passages"] == (len(CORPUS) if rr is encoding_rr else 0), name
        assert store.stats()["entries"] == len(CORPUS), name

    expected = engine_ranking(
        Reranker.from_pretrained(kalm_checkpoint, store=store), QUERY, [text for _, text, _ in CORPUS], top_k=TOP
    )
    for name, got in rankings.items():
        assert [text for text, _ in got] == [text for text, _ in expected], name
        assert [score for _, score in got] == pytest.approx([score for _, score in expected], abs=1e-6), name


def test_the_same_url_gives_the_same_store_in_every_framework(kalm_checkpoint):
    url = "memory://?max_bytes=64MiB"
    langchain = LangChainRerank(model=str(kalm_checkpoint), store=url)
    llama_index = LlamaIndexRerank(model=str(kalm_checkpoint), store=url)
    haystack = KaLMRanker(model=str(kalm_checkpoint), store=url)
    stores = {id(c.get_reranker().store) for c in (langchain, llama_index, haystack)}
    assert stores == {id(adapters.shared_store(url))}
    # and the same model: one copy in memory for all three
    assert langchain.get_reranker() is llama_index.get_reranker() is haystack.get_reranker()


def test_shared_store_and_store_url():
    a = adapters.shared_store("memory://?max_bytes=1MiB")
    assert adapters.shared_store("memory://?max_bytes=1MiB") is a
    assert adapters.shared_store(None) is adapters.shared_store("memory://")
    assert adapters.store_url(a) == "memory://?max_bytes=1MiB"
    own = MemoryStore()
    assert adapters.shared_store(own) is own and adapters.store_url(own) is None
    with pytest.raises(ValueError, match="unknown store URL scheme"):
        adapters.shared_store("nosuch://x")
    with pytest.raises(ValueError, match="store must be a PassageStore or a store URL"):
        adapters.shared_store(42)


def test_shared_reranker_is_per_configuration_and_released_when_unused(kalm_checkpoint):
    store = MemoryStore()
    a = adapters.shared_reranker(kalm_checkpoint, store=store)
    assert adapters.shared_reranker(str(kalm_checkpoint), store=store) is a
    assert adapters.shared_reranker(kalm_checkpoint, store=MemoryStore()) is not a
    assert adapters.shared_reranker(kalm_checkpoint, store=store, batch_size=4) is not a
    first_id = id(a)
    del a
    gc.collect()
    assert not any(id(rr) == first_id for rr in adapters._rerankers.values())


def test_ranking_rule(reranker):
    texts = [CORPUS[0][1], None, CORPUS[2][1], "   ", CORPUS[7][1]]
    ranked = adapters.rank(reranker, QUERY, texts)
    engine = reranker.rerank(QUERY, [texts[0], texts[2], texts[4]])
    positions = [0, 2, 4]
    assert [(r.index, r.score) for r in ranked[:3]] == [(positions[e.index], e.score) for e in engine]
    assert [(r.index, r.score) for r in ranked[3:]] == [(1, 0.0), (3, 0.0)]  # no text: last, in input order
    assert adapters.rank(reranker, QUERY, texts, top=2) == ranked[:2]
    cut = ranked[1].score
    assert adapters.rank(reranker, QUERY, texts, score_threshold=cut) == [r for r in ranked if r.score >= cut]
    assert adapters.rank(reranker, QUERY, [None, ""]) == [adapters.Ranked(0, 0.0), adapters.Ranked(1, 0.0)]
    assert adapters.encode(reranker, [None, " "]) == adapters.EncodeReport()  # nothing to encode


def test_conventional_import_paths_coexist_with_the_frameworks_namespaces():
    import haystack_integrations
    import llama_index
    import llama_index.core
    from llama_index.core.postprocessor import SentenceTransformerRerank  # noqa: F401

    import haystack_integrations.components.rankers.kalm as haystack_kalm
    import llama_index.postprocessor.kalm_rerank as llama_index_kalm

    assert llama_index_kalm.KaLMRerank and haystack_kalm.KaLMRanker and llama_index.core.VectorStoreIndex
    # namespace packages shared with the frameworks' own packages: no __init__.py of ours there
    assert getattr(llama_index, "__file__", None) is None
    assert getattr(haystack_integrations, "__file__", None) is None
