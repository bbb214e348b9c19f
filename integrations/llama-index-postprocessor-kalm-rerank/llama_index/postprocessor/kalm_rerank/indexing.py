"""``KaLMPassageEncoder``: the indexing half of the LlamaIndex adapter.

FBNL is fast only when passages are encoded before queries arrive. Put this component last in an
``IngestionPipeline``'s transformations (after the splitter); :class:`~.base.KaLMRerank` on the same model
and store then finds the nodes in the cache and runs only the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.schema import BaseNode, TransformComponent

from kalm_rag import EncodeReport
from kalm_rag.adapters import aencode, encode
from llama_index.postprocessor.kalm_rerank._config import KaLMEngineConfig, node_text


class KaLMPassageEncoder(KaLMEngineConfig, TransformComponent):
    """Pre-encode nodes' text into the passage store; the nodes pass through unchanged.

    Note that ``IngestionPipeline``'s own cache skips every transformation for nodes it has seen; such
    nodes are then encoded on their first rerank instead (same result, paid at query time).

    With ``strict=True`` (the default) a store that does not keep the passages (full disk, Redis down or
    full) raises :class:`kalm_rag.errors.NotStoredError`, so that ingestion never reports success with the
    cache unfilled; with ``strict=False`` the nodes go through and ``last_report`` says what was not stored.

    Example:
        >>> from llama_index.core.ingestion import IngestionPipeline  # doctest: +SKIP
        >>> from llama_index.core.node_parser import SentenceSplitter  # doctest: +SKIP
        >>> pipeline = IngestionPipeline(transformations=[  # doctest: +SKIP
        ...     SentenceSplitter(), KaLMPassageEncoder(model="KaLM-Embedding/KaLM-Reranker-V1-Nano"), embed_model])
        >>> nodes = pipeline.run(documents=documents)  # doctest: +SKIP
    """

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this component under."""
        return "KaLMPassageEncoder"

    strict: bool = Field(default=True, description="Raise NotStoredError when the store does not keep passages.")

    _last_report: EncodeReport | None = PrivateAttr(default=None)

    @property
    def last_report(self) -> EncodeReport | None:
        """The :class:`kalm_rag.EncodeReport` of the last call; ``None`` before the first."""
        return self._last_report

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Encode the nodes not yet in the store and return them as they came.

        Raises:
            NotStoredError: ``strict`` and the store did not keep some passages.
        """
        nodes = list(nodes)
        if nodes:
            self._last_report = encode(
                self.get_reranker(), [node_text(n, self.title_key) for n in nodes], strict=self.strict
            )
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Async :meth:`__call__`: encoding runs on the reranker's worker thread, never the event loop."""
        nodes = list(nodes)
        if nodes:
            reranker = await self._handle.aget()
            self._last_report = await aencode(
                reranker, [node_text(n, self.title_key) for n in nodes], strict=self.strict
            )
        return nodes
