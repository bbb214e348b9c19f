"""LangChain adapter for kalm-rag: KaLM-Reranker-V1 (FBNL) reranking with a shared passage cache.

- :class:`KaLMRerank`: a ``BaseDocumentCompressor`` for ``ContextualCompressionRetriever``.
- :class:`KaLMPassageEncoder`: a ``BaseDocumentTransformer`` for the indexing side; it pre-encodes
  documents into the store as they go into a vector store, so that reranking them later costs only
  the decoder.

Install the ``langchain-kalm`` distribution (integrations/langchain-kalm in the kalm-rag repository).
"""

from langchain_kalm.indexing import KaLMPassageEncoder
from langchain_kalm.rerank import KaLMRerank

__all__ = ["KaLMPassageEncoder", "KaLMRerank"]
