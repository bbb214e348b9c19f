"""``KaLMRerank``: a LangChain document compressor that reranks with KaLM-Reranker-V1 (FBNL)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document

from kalm_rag.adapters import Ranked, arank, check_evidence_options, rank
from kalm_rag.validation import check_instruction, check_positive_int, check_ratio, check_score_threshold
from langchain_kalm._config import KaLMEngineConfig


class KaLMRerank(KaLMEngineConfig, BaseDocumentCompressor):
    """Rerank retrieved documents with KaLM-Reranker-V1; the score goes to ``metadata["relevance_score"]``.

    The passage text is ``Document.page_content``. Passages already in the store (see
    :class:`~langchain_kalm.KaLMPassageEncoder`) cost no encoder work; others are encoded and stored on
    first sight. Returns copies, best first; the caller's documents are never modified and each copy keeps
    its ``id``. A document with empty ``page_content`` scores 0.0 and comes last.

    Example:
        >>> from langchain_classic.retrievers import ContextualCompressionRetriever  # doctest: +SKIP
        >>> compressor = KaLMRerank(model="KaLM-Embedding/KaLM-Reranker-V1-Nano", top_n=3)  # doctest: +SKIP
        >>> retriever = ContextualCompressionRetriever(  # doctest: +SKIP
        ...     base_compressor=compressor, base_retriever=vector_store.as_retriever(search_kwargs={"k": 20}))
        >>> [d.metadata["relevance_score"] for d in retriever.invoke("capital of France?")]  # doctest: +SKIP
        [0.97, 0.41, 0.02]
    """

    top_n: int | None = 3
    """Number of documents to return; ``None`` returns every document that passes the threshold."""
    score_threshold: float | None = None
    """Keep only documents scoring at least this (scores are P(yes) in [0, 1])."""
    instruction: str | None = None
    """Task instruction for the prompt; ``None``: the official default."""
    ratio: int | None = None
    """MEP pooling ratio (1..32); ``None``: the reranker's default (4)."""
    evidence: bool = False
    """Put the sentences that made each document relevant in ``metadata["evidence"]``: ``{"start", "end",
    "score"}`` character spans into the original ``page_content``, best first."""
    prune: float | None = None
    """Prune each returned document to its best sentences, about this fraction of its characters (0..1]:
    ``page_content`` becomes the kept sentences in their original order; ``metadata["evidence"]`` lists them
    (spans into the original text, which is kept in ``metadata["unpruned_content"]``)."""
    prune_mass: float | None = None
    """Prune each returned document by evidence instead of length: keep its best sentences until they hold this
    share (0..1] of the document's evidence; the content and metadata change as with ``prune``. At most one of
    ``prune`` and ``prune_mass``."""

    def model_post_init(self, context: Any, /) -> None:
        """Check the ranking options at construction, before any document arrives."""
        if self.top_n is not None:
            check_positive_int(self.top_n, "top_n")
        check_score_threshold(self.score_threshold)
        check_instruction(self.instruction)
        if self.ratio is not None:
            check_ratio(self.ratio)
        check_evidence_options(self.evidence, self.prune, self.prune_mass)
        super().model_post_init(context)

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Rerank ``documents`` against ``query``.

        Args:
            documents: the retrieved documents (not modified).
            query: the query.
            callbacks: unused; accepted for the compressor interface.

        Returns:
            Copies of the best documents, best first, each with ``metadata["relevance_score"]``.
        """
        docs = list(documents)
        if not docs:
            return []
        ranked = rank(self.get_reranker(), query, self.passage_texts(docs), **self._options())
        return [_with_score(docs[r.index], r) for r in ranked]

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the model runs on the reranker's worker thread, never the loop."""
        docs = list(documents)
        if not docs:
            return []
        reranker = await self._handle.aget()
        ranked = await arank(reranker, query, self.passage_texts(docs), **self._options())
        return [_with_score(docs[r.index], r) for r in ranked]

    def _options(self) -> dict[str, Any]:
        return dict(
            top=self.top_n,
            score_threshold=self.score_threshold,
            instruction=self.instruction,
            ratio=self.ratio,
            evidence=self.evidence,
            prune=self.prune,
            prune_mass=self.prune_mass,
        )


def _with_score(doc: Document, ranked: Ranked) -> Document:
    """A copy of ``doc`` (same id) whose metadata also holds the score (and evidence; pruned content)."""
    metadata = {**doc.metadata, "relevance_score": ranked.score}
    update: dict[str, Any] = {"metadata": metadata}
    if ranked.evidence is not None:
        metadata["evidence"] = ranked.evidence_in(doc.page_content)
    if ranked.pruned_text is not None:
        metadata["unpruned_content"] = doc.page_content
        update["page_content"] = ranked.pruned_text
    return doc.model_copy(update=update)
