"""LlamaIndex adapter for kalm-rag: KaLM-Reranker-V1 (FBNL) reranking with a shared passage cache.

- :class:`KaLMRerank`: a node postprocessor for query engines and retrievers.
- :class:`KaLMPassageEncoder`: a ``TransformComponent`` for ``IngestionPipeline`` that pre-encodes nodes
  into the passage store and passes them on unchanged.

Install the ``llama-index-postprocessor-kalm-rerank`` distribution (integrations/ in the kalm-rag repository).
"""

from llama_index.postprocessor.kalm_rerank.base import KaLMRerank
from llama_index.postprocessor.kalm_rerank.indexing import KaLMPassageEncoder

__all__ = ["KaLMPassageEncoder", "KaLMRerank"]
