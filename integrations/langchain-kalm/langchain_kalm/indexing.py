"""``KaLMPassageEncoder``: the indexing half of the LangChain adapter.

FBNL is fast only when passages are encoded before queries arrive. Run documents through this
transformer on their way into a vector store; :class:`~langchain_kalm.KaLMRerank` on the same model and
store then finds them in the cache and runs only the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import BaseDocumentTransformer, Document
from pydantic import PrivateAttr

from kalm_rag import EncodeReport
from kalm_rag.adapters import aencode, encode
from langchain_kalm._config import KaLMEngineConfig


class KaLMPassageEncoder(KaLMEngineConfig, BaseDocumentTransformer):
    """Pre-encode ``page_content`` of documents into the passage store; the documents pass through unchanged.

    With ``strict=True`` (the default) a store that does not keep the passages (full disk, Redis down or
    full) raises :class:`kalm_rag.errors.NotStoredError`, so that an indexing job never reports success
    with the cache unfilled; ``strict=False`` logs nothing and lets the documents through (the passages
    are then encoded at query time). ``last_report`` holds the engine's report of the last call.

    Example:
        >>> encoder = KaLMPassageEncoder(model="KaLM-Embedding/KaLM-Reranker-V1-Nano")  # doctest: +SKIP
        >>> chunks = splitter.split_documents(raw_docs)  # doctest: +SKIP
        >>> vector_store.add_documents(encoder.transform_documents(chunks))  # doctest: +SKIP
    """

    strict: bool = True
    """Raise ``NotStoredError`` when the store does not keep the encoded passages (else only report it)."""

    _last_report: EncodeReport | None = PrivateAttr(default=None)

    @property
    def last_report(self) -> EncodeReport | None:
        """The :class:`kalm_rag.EncodeReport` of the last (a)transform call; ``None`` before the first."""
        return self._last_report

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """Encode the documents not yet in the store and return them as they came (same objects, same order).

        Raises:
            NotStoredError: ``strict`` and the store did not keep some passages.
        """
        docs = list(documents)
        if docs:
            self._last_report = encode(self.get_reranker(), self.passage_texts(docs), strict=self.strict)
        return docs

    async def atransform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """Async :meth:`transform_documents`: encoding runs on the reranker's worker thread, never the loop."""
        docs = list(documents)
        if docs:
            reranker = await self._handle.aget()
            self._last_report = await aencode(reranker, self.passage_texts(docs), strict=self.strict)
        return docs
