"""Indexing through any framework never fails silently (issue #15, item 5): a store that does not keep the
passages makes each adapter's indexing component raise (``strict=True``, the default) or report it.
"""

from __future__ import annotations

import pytest
from haystack import Document as HaystackDocument
from langchain_core.documents import Document as LangChainDocument
from llama_index.core.schema import TextNode

from haystack_integrations.components.rankers.kalm import KaLMPassageEncoder as HaystackEncoder
from kalm_rag import NotStoredError, Reranker, StoreConfigError
from langchain_kalm import KaLMPassageEncoder as LangChainEncoder
from llama_index.postprocessor.kalm_rerank import KaLMPassageEncoder as LlamaIndexEncoder
from tests.integrations.helpers import TEXTS
from tests.store.helpers import full_sqlite

PASSAGES = TEXTS[:3]


@pytest.mark.parametrize("strict", [True, False])
def test_the_adapters_indexing_components_do_not_fail_silently(kalm_checkpoint, tmp_path, strict):
    rr = Reranker.from_pretrained(kalm_checkpoint, store=full_sqlite(tmp_path / "p.db"))
    langchain = LangChainEncoder(reranker=rr, strict=strict)
    llama = LlamaIndexEncoder(reranker=rr, strict=strict)
    haystack = HaystackEncoder(model=str(kalm_checkpoint), store=rr.store, strict=strict)
    runs = {
        "langchain": lambda: langchain.transform_documents([LangChainDocument(page_content=p) for p in PASSAGES]),
        "llama_index": lambda: llama([TextNode(text=p) for p in PASSAGES]),
        "haystack": lambda: haystack.run(documents=[HaystackDocument(content=p) for p in PASSAGES]),
    }
    for name, run in runs.items():
        if strict:
            with pytest.raises(NotStoredError, match="3 of 3 passages were not stored"):
                run()
        else:
            out = run()
            assert (out["report"]["not_stored"] if name == "haystack" else len(out)) == 3, name
    if not strict:
        assert langchain.last_report is not None and langchain.last_report.not_stored == 3
        assert llama.last_report is not None and llama.last_report.not_stored == 3


@pytest.mark.parametrize(
    "url, message",
    [
        ("sqlite:///p.db?timout=3", "did you mean 'timeout'"),
        ("redis://localhost/0?socket_timout=1", "did you mean 'socket_timeout'"),
        ("postgres://db/x", "unknown store URL scheme"),
    ],
)
def test_every_adapter_refuses_a_bad_store_url_when_built_with_a_kalm_error(url, message, tmp_path, monkeypatch):
    from haystack_integrations.components.rankers.kalm import KaLMRanker
    from langchain_kalm import KaLMRerank as LangChainRerank
    from llama_index.postprocessor.kalm_rerank import KaLMRerank as LlamaIndexRerank

    monkeypatch.chdir(tmp_path)
    for cls in (LangChainRerank, LangChainEncoder, LlamaIndexRerank, LlamaIndexEncoder, KaLMRanker, HaystackEncoder):
        # before: accepted, then a ValueError (or a TypeError at every call) at the first document
        with pytest.raises(StoreConfigError, match=message):
            cls(store=url)
    assert list(tmp_path.iterdir()) == []  # checked, not opened
