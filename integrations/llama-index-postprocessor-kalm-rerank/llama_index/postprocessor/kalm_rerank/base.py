"""``KaLMRerank``: a LlamaIndex node postprocessor that reranks with KaLM-Reranker-V1 (FBNL)."""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle

from kalm_rag import InvalidInputError
from kalm_rag.adapters import Ranked, arank, check_evidence_options, rank
from kalm_rag.validation import check_instruction, check_positive_int, check_ratio
from llama_index.postprocessor.kalm_rerank._config import KaLMEngineConfig, node_text

dispatcher = get_dispatcher(__name__)


class KaLMRerank(KaLMEngineConfig, BaseNodePostprocessor):
    """Rerank retrieved nodes with KaLM-Reranker-V1.

    The passage text is ``node.get_content(MetadataMode.NONE)``. Passages already in the store (see
    :class:`~llama_index.postprocessor.kalm_rerank.KaLMPassageEncoder`) cost no encoder work. Returns new
    ``NodeWithScore`` objects, best first, whose score is P(yes); the input list and its nodes are not
    modified. A node without text scores 0.0 and comes last. Emits ``ReRankStartEvent`` /
    ``ReRankEndEvent`` on the instrumentation dispatcher and a ``RERANKING`` callback event.

    Example:
        >>> reranker = KaLMRerank(model="KaLM-Embedding/KaLM-Reranker-V1-Nano", top_n=3)  # doctest: +SKIP
        >>> engine = index.as_query_engine(similarity_top_k=20, node_postprocessors=[reranker])  # doctest: +SKIP
        >>> [round(n.score, 2) for n in engine.query("capital of France?").source_nodes]  # doctest: +SKIP
        [0.97, 0.41, 0.02]
    """

    top_n: int = Field(default=3, description="Number of nodes to return, best first.")
    keep_retrieval_score: bool = Field(
        default=False, description="Keep the retriever's score in metadata['retrieval_score'] (of a node copy)."
    )
    instruction: str | None = Field(default=None, description="Task instruction; None: the official default.")
    ratio: int | None = Field(default=None, description="MEP pooling ratio (1..32); None: the reranker's default.")
    evidence: bool = Field(
        default=False,
        description="Put the sentences that made each node relevant in metadata['evidence'] ({start, end, score} "
        "character spans into the node's text, best first).",
    )
    prune: float | None = Field(
        default=None,
        description="Prune each returned node's text to its best sentences, about this fraction of its characters "
        "(0..1], kept in their original order (a node copy; metadata['evidence'] lists the kept sentences).",
    )
    prune_mass: float | None = Field(
        default=None,
        description="Prune each returned node's text by evidence instead of length: keep its best sentences until "
        "they hold this share (0..1] of the node's evidence (as with prune otherwise; at most one of the two).",
    )

    def model_post_init(self, context: Any, /) -> None:
        """Check the ranking options at construction, before any node arrives."""
        check_positive_int(self.top_n, "top_n")
        check_instruction(self.instruction)
        if self.ratio is not None:
            check_ratio(self.ratio)
        check_evidence_options(self.evidence, self.prune, self.prune_mass)
        super().model_post_init(context)

    @classmethod
    def class_name(cls) -> str:
        """The name LlamaIndex serializes this component under."""
        return "KaLMRerank"

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        query = self._start(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, query)) as event:
            ranked = rank(self.get_reranker(), query, self._texts(nodes), **self._options()) if nodes else []
            new_nodes = self._rescored(nodes, ranked)
            event.on_end(payload={EventPayload.NODES: new_nodes})
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes

    async def _apostprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        query = self._start(nodes, query_bundle)
        with self.callback_manager.event(CBEventType.RERANKING, payload=self._payload(nodes, query)) as event:
            if nodes:
                reranker = await self._handle.aget()
                ranked = await arank(reranker, query, self._texts(nodes), **self._options())
            else:
                ranked = []
            new_nodes = self._rescored(nodes, ranked)
            event.on_end(payload={EventPayload.NODES: new_nodes})
        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes

    # ----- helpers ---------------------------------------------------------------------------------

    def _start(self, nodes: list[NodeWithScore], query_bundle: QueryBundle | None) -> str:
        dispatcher.event(
            ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n, model_name=self._handle.model_name)
        )
        if query_bundle is None:
            raise InvalidInputError("KaLMRerank needs a query: pass query_bundle= or query_str=")
        return query_bundle.query_str

    def _payload(self, nodes: list[NodeWithScore], query: str) -> dict[str, Any]:
        return {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self._handle.model_name,
            EventPayload.QUERY_STR: query,
            EventPayload.TOP_K: self.top_n,
        }

    def _options(self) -> dict[str, Any]:
        return dict(
            top=self.top_n,
            instruction=self.instruction,
            ratio=self.ratio,
            evidence=self.evidence,
            prune=self.prune,
            prune_mass=self.prune_mass,
        )

    def _texts(self, nodes: list[NodeWithScore]) -> list[str | None]:
        return [node_text(n.node, self.title_key) for n in nodes]

    def _rescored(self, nodes: list[NodeWithScore], ranked: list[Ranked]) -> list[NodeWithScore]:
        out = []
        for r in ranked:
            old = nodes[r.index]
            node = old.node
            if self.keep_retrieval_score:  # on a copy: the caller's node keeps its metadata
                node = node.model_copy(update={"metadata": {**node.metadata, "retrieval_score": old.score}})
            if r.evidence is not None:  # on a copy too, text pruned when asked
                node = _with_evidence(node, r)
            out.append(NodeWithScore(node=node, score=r.score))
        return out


def _with_evidence(node: Any, ranked: Ranked) -> Any:
    """A copy of ``node`` with ``metadata["evidence"]`` (spans into its text) and, when pruned, the pruned text.

    The evidence and the unpruned text are kept out of the text the LLM and the embedder see
    (``excluded_llm_metadata_keys`` / ``excluded_embed_metadata_keys``).
    """
    text = node.get_content(MetadataMode.NONE)
    metadata = {**node.metadata, "evidence": ranked.evidence_in(text)}
    update: dict[str, Any] = {"metadata": metadata}
    hidden = ["evidence"]
    if ranked.pruned_text is not None and hasattr(node, "text"):
        metadata["unpruned_text"] = text
        hidden.append("unpruned_text")
        update["text"] = ranked.pruned_text
    for key in ("excluded_llm_metadata_keys", "excluded_embed_metadata_keys"):
        if hasattr(node, key):
            update[key] = [*getattr(node, key), *(h for h in hidden if h not in getattr(node, key))]
    return node.model_copy(update=update)
