"""Haystack adapter for kalm-rag: KaLM-Reranker-V1 (FBNL) reranking with a shared passage cache.

- :class:`KaLMRanker`: a ranker for query pipelines (after a retriever).
- :class:`KaLMPassageEncoder`: its indexing-side half; it pre-encodes documents into the passage store
  and outputs them unchanged, so it sits before a ``DocumentWriter``.

Both live here rather than under ``components.embedders``: the encoder writes no ``Document.embedding``
(an embedder's contract); it only warms the ranker's cache and is useless without the ranker.

Install the ``kalm-haystack`` distribution (integrations/kalm-haystack in the kalm-rag repository).
"""

from haystack_integrations.components.rankers.kalm.encoder import KaLMPassageEncoder
from haystack_integrations.components.rankers.kalm.ranker import KaLMRanker

__all__ = ["KaLMPassageEncoder", "KaLMRanker"]
