"""Evidence spans and pruning through the three framework adapters (LangChain, LlamaIndex, Haystack).

Each adapter must return what the engine says: the same spans (shifted onto the document's own text), the
pruned text when pruning is on, and the caller's documents untouched.
"""

from __future__ import annotations

import copy

import pytest

from kalm_rag import InvalidInputError
from tests.integrations.helpers import QUERY

DOCS = [
    ("a", "France is in Europe. Paris is the capital of France. It lies on the Seine."),
    ("b", "Bananas are yellow. They grow in warm places."),
    ("c", "Berlin is the capital of Germany. It has many museums."),
]
TEXTS = [t for _, t in DOCS]


def engine_evidence(reranker, prune=None, prune_mass=None):
    """text -> (spans as dicts, pruned text) according to the engine."""
    ranked = reranker.rerank(QUERY, TEXTS, evidence=True, prune=prune, prune_mass=prune_mass)
    return {r.text: ([s.to_dict() for s in r.evidence or ()], r.pruned_text) for r in ranked}


def check_spans_index_text(spans, text):
    assert spans
    for span in spans:
        assert 0 <= span["start"] < span["end"] <= len(text)


def test_langchain_metadata_and_pruned_page_content(reranker):
    from langchain_core.documents import Document

    from langchain_kalm import KaLMRerank

    docs = [Document(page_content=t, id=i, metadata={"k": i}) for i, t in DOCS]
    before = copy.deepcopy(docs)
    expected = engine_evidence(reranker)
    out = KaLMRerank(reranker=reranker, top_n=3, evidence=True).compress_documents(docs, QUERY)
    for doc in out:
        assert doc.metadata["evidence"] == expected[doc.page_content][0]
        check_spans_index_text(doc.metadata["evidence"], doc.page_content)
    pruned = engine_evidence(reranker, prune=0.4)
    out = KaLMRerank(reranker=reranker, top_n=3, prune=0.4).compress_documents(docs, QUERY)
    for doc in out:
        original = doc.metadata["unpruned_content"]
        assert doc.page_content == pruned[original][1]
        assert doc.metadata["evidence"] == pruned[original][0]
        assert len(doc.page_content) < len(original)
    assert docs == before  # the caller's documents are untouched
    plain = KaLMRerank(reranker=reranker, top_n=3).compress_documents(docs, QUERY)
    assert all("evidence" not in d.metadata for d in plain)
    with pytest.raises(InvalidInputError, match="prune"):
        KaLMRerank(reranker=reranker, prune=2.0)


def test_llama_index_node_metadata_and_pruned_text(reranker):
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

    from llama_index.postprocessor.kalm_rerank import KaLMRerank

    nodes = [NodeWithScore(node=TextNode(text=t, id_=i), score=0.5) for i, t in DOCS]
    expected = engine_evidence(reranker)
    out = KaLMRerank(reranker=reranker, top_n=3, evidence=True).postprocess_nodes(nodes, QueryBundle(QUERY))
    for n in out:
        text = n.node.get_content(MetadataMode.NONE)
        assert n.node.metadata["evidence"] == expected[text][0]
        assert "evidence" not in n.node.get_content(MetadataMode.LLM)  # spans stay out of the LLM's text
    pruned = engine_evidence(reranker, prune=0.4)
    out = KaLMRerank(reranker=reranker, top_n=3, prune=0.4).postprocess_nodes(nodes, QueryBundle(QUERY))
    for n in out:
        original = n.node.metadata["unpruned_text"]
        assert n.node.get_content(MetadataMode.NONE) == pruned[original][1]
        assert original not in n.node.get_content(MetadataMode.LLM)
    assert [n.node.get_content(MetadataMode.NONE) for n in nodes] == TEXTS  # inputs untouched


def test_haystack_meta_and_pruned_content(reranker):
    from haystack import Document

    from haystack_integrations.components.rankers.kalm import KaLMRanker

    docs = [Document(content=t, id=i) for i, t in DOCS]
    expected = engine_evidence(reranker)
    ranker = KaLMRanker(top_k=3, evidence=True)
    ranker._handle._reranker = reranker  # the test's reranker (no load)
    for doc in ranker.run(query=QUERY, documents=docs)["documents"]:
        assert doc.meta["evidence"] == expected[doc.content][0]
    pruned = engine_evidence(reranker, prune=0.4)
    ranker = KaLMRanker(top_k=3, prune=0.4)
    ranker._handle._reranker = reranker
    for doc in ranker.run(query=QUERY, documents=docs)["documents"]:
        assert doc.content == pruned[doc.meta["unpruned_content"]][1]
    assert KaLMRanker.from_dict(ranker.to_dict()).prune == 0.4
    assert [d.content for d in docs] == TEXTS and all("evidence" not in d.meta for d in docs)


def test_title_key_spans_are_shifted_onto_the_document_text(reranker):
    from langchain_core.documents import Document

    from langchain_kalm import KaLMRerank

    text = "Paris is the capital of France. It lies on the Seine."
    doc = Document(page_content=text, metadata={"title": "Paris. A city"})
    out = KaLMRerank(reranker=reranker, evidence=True, title_key="title").compress_documents([doc], QUERY)
    spans = out[0].metadata["evidence"]
    check_spans_index_text(spans, text)
    # the sentence that began in the title is cut at the title's end; the title's own sentence is left out
    assert {text[s["start"] : s["end"]] for s in spans} == {"Paris is the capital of France.", "It lies on the Seine."}


# ----- prune_mass: pruning by evidence share, exactly as the engine does it ----------------------------------

MASS = 0.5


def test_rank_and_arank_forward_prune_mass(reranker):
    import asyncio

    from kalm_rag.adapters import arank, rank

    pruned = engine_evidence(reranker, prune_mass=MASS)
    for ranked in (
        rank(reranker, QUERY, TEXTS, prune_mass=MASS),
        asyncio.run(arank(reranker, QUERY, TEXTS, prune_mass=MASS)),
    ):
        assert len(ranked) == len(TEXTS)
        for r in ranked:
            assert r.pruned_text == pruned[TEXTS[r.index]][1]
            assert [s.to_dict() for s in r.evidence or ()] == pruned[TEXTS[r.index]][0]


def test_check_evidence_options_prune_mass():
    from kalm_rag.adapters import check_evidence_options

    assert check_evidence_options(False, None) == (False, None, None)
    assert check_evidence_options(True, None, 1) == (True, None, 1.0)
    assert check_evidence_options(False, 0.4, None) == (False, 0.4, None)
    with pytest.raises(InvalidInputError, match="prune.*prune_mass.*not both"):
        check_evidence_options(False, 0.4, 0.5)
    for bad in (0, 0.0, 1.5, -0.1, True, "0.5", float("nan")):
        with pytest.raises(InvalidInputError, match="prune_mass"):
            check_evidence_options(False, None, bad)


def test_langchain_prune_mass(reranker):
    from langchain_core.documents import Document

    from langchain_kalm import KaLMRerank

    docs = [Document(page_content=t, id=i) for i, t in DOCS]
    before = copy.deepcopy(docs)
    pruned = engine_evidence(reranker, prune_mass=MASS)
    out = KaLMRerank(reranker=reranker, top_n=3, prune_mass=MASS).compress_documents(docs, QUERY)
    assert len(out) == 3
    for doc in out:
        original = doc.metadata["unpruned_content"]
        assert doc.page_content == pruned[original][1]
        assert doc.metadata["evidence"] == pruned[original][0]
        assert len(doc.page_content) < len(original)
    out = asyncio_run(KaLMRerank(reranker=reranker, top_n=3, prune_mass=MASS).acompress_documents(docs, QUERY))
    assert [d.page_content for d in out] == [pruned[d.metadata["unpruned_content"]][1] for d in out]
    assert docs == before
    with pytest.raises(InvalidInputError, match="prune_mass"):
        KaLMRerank(reranker=reranker, prune_mass=0.0)
    with pytest.raises(InvalidInputError, match="not both"):
        KaLMRerank(reranker=reranker, prune=0.4, prune_mass=0.5)


def test_llama_index_prune_mass(reranker):
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

    from llama_index.postprocessor.kalm_rerank import KaLMRerank

    nodes = [NodeWithScore(node=TextNode(text=t, id_=i), score=0.5) for i, t in DOCS]
    pruned = engine_evidence(reranker, prune_mass=MASS)
    out = KaLMRerank(reranker=reranker, top_n=3, prune_mass=MASS).postprocess_nodes(nodes, QueryBundle(QUERY))
    assert len(out) == 3
    for n in out:
        original = n.node.metadata["unpruned_text"]
        assert n.node.get_content(MetadataMode.NONE) == pruned[original][1]
        assert n.node.metadata["evidence"] == pruned[original][0]
    assert [n.node.get_content(MetadataMode.NONE) for n in nodes] == TEXTS
    with pytest.raises(InvalidInputError, match="prune_mass"):
        KaLMRerank(reranker=reranker, prune_mass=1.5)
    with pytest.raises(InvalidInputError, match="not both"):
        KaLMRerank(reranker=reranker, prune=0.4, prune_mass=0.5)


def test_haystack_prune_mass_and_serialisation(reranker):
    from haystack import Document

    from haystack_integrations.components.rankers.kalm import KaLMRanker

    docs = [Document(content=t, id=i) for i, t in DOCS]
    pruned = engine_evidence(reranker, prune_mass=MASS)
    ranker = KaLMRanker(top_k=3, prune_mass=MASS)
    ranker._handle._reranker = reranker
    out = ranker.run(query=QUERY, documents=docs)["documents"]
    assert len(out) == 3
    for doc in out:
        assert doc.content == pruned[doc.meta["unpruned_content"]][1]
        assert doc.meta["evidence"] == pruned[doc.meta["unpruned_content"]][0]
    out = asyncio_run(ranker.run_async(query=QUERY, documents=docs))["documents"]
    assert [d.content for d in out] == [pruned[d.meta["unpruned_content"]][1] for d in out]
    data = ranker.to_dict()
    assert data["init_parameters"]["prune_mass"] == MASS and data["init_parameters"]["prune"] is None
    restored = KaLMRanker.from_dict(data)
    assert (restored.prune, restored.prune_mass) == (None, MASS)
    assert [d.content for d in docs] == TEXTS
    with pytest.raises(InvalidInputError, match="prune_mass"):
        KaLMRanker(prune_mass=-1)
    with pytest.raises(InvalidInputError, match="not both"):
        KaLMRanker(prune=0.4, prune_mass=0.5)


def asyncio_run(coro):
    import asyncio

    return asyncio.run(coro)
