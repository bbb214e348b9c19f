"""``KaLMPassageEncoder``: the indexing half of the LangChain adapter.

FBNL is fast only when passages are encoded before queries arrive. Run documents through this
transformer on their way into a vector store; :class:`~langchain_kalm.KaLMRerank` on the same model and
store then finds them in the cache and runs only the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import BaseDocumentTransformer, Document

from kalm_rag.adapters import aencode, encode
from langchain_kalm._config import KaLMEngineConfig


class KaLMPassageEncoder(KaLMEngineConfig, BaseDocumentTransformer):
    """Pre-encode ``page_content`` of documents into the passage store; the documents pass through unchanged.

    Example:
        >>> encoder = KaLMPassageEncoder(model="KaLM-Embedding/KaLM-Reranker-V1-Nano")  # doctest: +SKIP
        >>> chunks = splitter.split_documents(raw_docs)  # doctest: +SKIP
        >>> vector_store.add_documents(encoder.transform_documents(chunks))  # doctest: +SKIP
    """

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """Encode the documents not yet in the store and return them as they came (same objects, same order)."""
        docs = list(documents)
        if docs:
            encode(self.get_reranker(), [d.page_content for d in docs])
        return docs

    async def atransform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        """Async :meth:`transform_documents`: encoding runs on the reranker's worker thread, never the loop."""
        docs = list(documents)
        if docs:
            await aencode(await self._handle.aget(), [d.page_content for d in docs])
        return docs
