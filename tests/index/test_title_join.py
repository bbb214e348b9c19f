"""One join of a title and a text: ``kalm-rag index --title-field`` and the three adapters' ``title_key``."""

from __future__ import annotations

import pytest

from kalm_rag import Reranker
from kalm_rag.adapters import document_text
from kalm_rag.errors import InvalidInputError
from kalm_rag.index import index_corpus, passage_text
from kalm_rag.store import passage_key
from kalm_rag.store.sqlite import SQLiteStore
from tests.index.helpers import write_jsonl

ROWS = [
    {"title": "Paris", "text": "is the capital of France."},
    {"title": "Bananas", "text": " are yellow. "},
    {"text": "A passage without a title."},
]


def test_document_text_is_passage_text_with_a_title_and_the_text_alone_without():
    assert document_text("is the capital.", {"title": "Paris"}, "title") == "Paris is the capital."
    assert document_text("is the capital.", {"title": "Paris"}, "title") == passage_text("Paris", "is the capital.")
    assert document_text(" text ", {"title": "Paris"}, None) == " text "  # the default: unchanged
    assert document_text(" text ", {"name": "Paris"}, "title") == " text "  # no title in this document
    assert document_text(" text ", {"title": " "}, "title") == " text "
    assert document_text(" text ", {"title": 3}, "title") == " text "
    assert document_text(None, {"title": "Paris"}, "title") is None  # no text: left for the ranking rule


def _indexed(tiny_checkpoint, tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    report = index_corpus(
        write_jsonl(tmp_path / "c.jsonl", ROWS), model=tiny_checkpoint, store=url, title_field="title"
    )
    assert report.encoded == 3
    namespace = Reranker.from_pretrained(tiny_checkpoint).namespace
    want = {
        passage_key("Paris is the capital of France."),
        passage_key("Bananas are yellow."),
        passage_key(ROWS[2]["text"]),
    }
    assert set(SQLiteStore(tmp_path / "p.db").iter_keys(namespace)) == want
    return url


def test_langchain_title_key_finds_what_index_stored(tiny_checkpoint, tmp_path):
    pytest.importorskip("langchain_core")
    from langchain_core.documents import Document

    from langchain_kalm import KaLMPassageEncoder

    url = _indexed(tiny_checkpoint, tmp_path)
    docs = [Document(page_content=r["text"], metadata={k: v for k, v in r.items() if k != "text"}) for r in ROWS]
    encoder = KaLMPassageEncoder(model=str(tiny_checkpoint), store=url, title_key="title")
    encoder.transform_documents(docs)
    assert encoder.last_report is not None and encoder.last_report.already_present == 3
    untitled = KaLMPassageEncoder(model=str(tiny_checkpoint), store=url)  # default: the text alone
    untitled.transform_documents(docs)
    assert untitled.last_report is not None and untitled.last_report.already_present == 1
    with pytest.raises(InvalidInputError, match="title_key"):
        KaLMPassageEncoder(model=str(tiny_checkpoint), store=url, title_key="")


def test_llama_index_title_key_finds_what_index_stored(tiny_checkpoint, tmp_path):
    pytest.importorskip("llama_index.core")
    from llama_index.core.schema import TextNode

    from llama_index.postprocessor.kalm_rerank import KaLMPassageEncoder

    url = _indexed(tiny_checkpoint, tmp_path)
    nodes = [TextNode(text=r["text"], metadata={k: v for k, v in r.items() if k != "text"}) for r in ROWS]
    encoder = KaLMPassageEncoder(model=str(tiny_checkpoint), store=url, title_key="title")
    encoder(nodes)
    assert encoder.last_report is not None and encoder.last_report.already_present == 3


def test_haystack_title_key_finds_what_index_stored(tiny_checkpoint, tmp_path):
    pytest.importorskip("haystack")
    from haystack import Document

    from haystack_integrations.components.rankers.kalm import KaLMPassageEncoder, KaLMRanker

    url = _indexed(tiny_checkpoint, tmp_path)
    docs = [Document(content=r["text"], meta={k: v for k, v in r.items() if k != "text"}) for r in ROWS]
    encoder = KaLMPassageEncoder(model=str(tiny_checkpoint), store=url, title_key="title")
    assert encoder.run(documents=docs)["report"]["already_present"] == 3
    ranker = KaLMRanker(model=str(tiny_checkpoint), store=url, title_key="title")
    assert KaLMRanker.from_dict(ranker.to_dict()).title_key == "title"
    ranker.run(query="capital?", documents=docs)
    assert ranker.get_reranker().counters["encoded_passages"] == 0  # every titled passage was a store hit
