"""``KaLMRanker``: a Haystack ranker on KaLM-Reranker-V1 (FBNL)."""

from dataclasses import replace
from pathlib import Path
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.components.rankers.kalm._base import KaLMComponentBase, deserialize_store
from kalm_rag import PassageStore
from kalm_rag.adapters import DEFAULT_MODEL, DEFAULT_STORE_URL, Ranked, arank, check_evidence_options, rank
from kalm_rag.validation import check_instruction, check_positive_int, check_ratio, check_score_threshold


@component
class KaLMRanker(KaLMComponentBase):
    """Ranks documents by their relevance to the query with KaLM-Reranker-V1; ``Document.score`` is P(yes).

    The passage text is ``Document.content``. Passages already in the store (see
    :class:`~haystack_integrations.components.rankers.kalm.KaLMPassageEncoder`) cost no encoder work.
    Documents are de-duplicated by id (keeping the highest-scored duplicate) and returned as copies, best
    first; inputs are never modified. A document without content scores 0.0 and comes last.

    ### Usage example

    ```python
    from haystack import Document
    from haystack_integrations.components.rankers.kalm import KaLMRanker

    ranker = KaLMRanker(model="KaLM-Embedding/KaLM-Reranker-V1-Nano", top_k=2)
    docs = [Document(content="Paris is in France."), Document(content="Berlin is in Germany.")]
    result = ranker.run(query="City in Germany", documents=docs)
    print(result["documents"][0].content)
    ```
    """

    def __init__(
        self,
        *,
        model: str | Path = DEFAULT_MODEL,
        store: str | PassageStore | Secret = DEFAULT_STORE_URL,
        device: ComponentDevice | None = None,
        top_k: int = 10,
        score_threshold: float | None = None,
        instruction: str | None = None,
        ratio: int | None = None,
        batch_size: int = 32,
        title_key: str | None = None,
        evidence: bool = False,
        prune: float | None = None,
        prune_mass: float | None = None,
        storage: str | None = None,
    ) -> None:
        """Create a KaLMRanker; the model is loaded by :meth:`warm_up` (or the first run), not here.

        :param model:
            Checkpoint folder, hub id (e.g. ``KaLM-Embedding/KaLM-Reranker-V1-Nano``) or ``"kalm-mini"``.
        :param store:
            Passage store URL (``memory://``, ``sqlite:///path``, ``redis://host:port/db``) or object.
            Components with the same URL in one process share the store; only a URL can be serialized. A URL
            with credentials goes in a ``Secret`` (``Secret.from_env_var("KALM_RAG_STORE")``), which
            ``to_dict`` writes as the variable's name, never as the password.
        :param device:
            The device to run on; ``None``: CUDA when available, else CPU.
        :param top_k:
            The maximum number of documents to return.
        :param score_threshold:
            Return only documents scoring at least this (scores are P(yes) in [0, 1]).
        :param instruction:
            Task instruction of the prompt; ``None``: the official default.
        :param ratio:
            MEP pooling ratio (1..32); ``None``: the reranker's default (4).
        :param batch_size:
            Passages per encoder or decoder batch.
        :param title_key:
            Metadata key of a title put before ``content`` (``kalm_rag.index.passage_text``); ``None``: the text
            alone. Use the same setting as ``kalm-rag index --title-field``.
        :param evidence:
            Put the sentences that made each document relevant in ``meta["evidence"]``: ``{"start", "end",
            "score"}`` character spans into ``content``, best first.
        :param prune:
            Prune each returned document's ``content`` to its best sentences, about this fraction of its characters
            (0..1], in their original order; ``meta["evidence"]`` then lists the kept sentences (spans into the
            original content, kept in ``meta["unpruned_content"]``).
        :param prune_mass:
            Prune by evidence instead of length: keep each returned document's best sentences until they hold this
            share (0..1] of its evidence; ``content`` and ``meta`` change as with ``prune``. At most one of
            ``prune`` and ``prune_mass``.
        :param storage:
            How passage vectors are stored (``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2``, ``res1``);
            ``None``: the store's recorded setting for the model (as ``kalm-rag index`` wrote it), else the
            model's default.
        :raises ValueError:
            If ``top_k`` is not > 0, another option is out of range, or both ``prune`` and ``prune_mass`` are set.
        """
        self.top_k = check_positive_int(top_k, "top_k")
        self.score_threshold = check_score_threshold(score_threshold)
        self.instruction = check_instruction(instruction)
        self.ratio = None if ratio is None else check_ratio(ratio)
        self.evidence, self.prune, self.prune_mass = check_evidence_options(evidence, prune, prune_mass)
        # explicit base call: @component rebuilds the class, which breaks zero-argument super()
        KaLMComponentBase.__init__(
            self, model=model, store=store, device=device, batch_size=batch_size, title_key=title_key, storage=storage
        )

    def to_dict(self) -> dict[str, Any]:
        """Serialize the component to a dictionary of basic types."""
        return default_to_dict(
            self,
            **self._base_init_parameters(),
            top_k=self.top_k,
            score_threshold=self.score_threshold,
            instruction=self.instruction,
            ratio=self.ratio,
            evidence=self.evidence,
            prune=self.prune,
            prune_mass=self.prune_mass,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KaLMRanker":
        """Deserialize the component from a dictionary."""
        return default_from_dict(cls, deserialize_store(data))

    @component.output_types(documents=list[Document])
    def run(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, list[Document]]:
        """Rank ``documents`` by relevance to ``query``.

        :param query:
            The query.
        :param documents:
            The documents to rank (not modified).
        :param top_k:
            The maximum number of documents to return; overrides the init value when set.
        :param score_threshold:
            Minimum score to keep a document; overrides the init value when set.
        :returns:
            ``documents``: copies of the best documents, best first, with ``score`` set.
        :raises ValueError:
            If ``top_k`` is not > 0 or the query is empty.
        """
        options, docs = self._prepare(documents, top_k, score_threshold)
        if not docs:
            return {"documents": []}
        ranked = rank(self.get_reranker(), query, self.passage_texts(docs), **options)
        return {"documents": [_with_score(docs[r.index], r) for r in ranked]}

    @component.output_types(documents=list[Document])
    async def run_async(
        self,
        query: str,
        documents: list[Document],
        top_k: int | None = None,
        score_threshold: float | None = None,
    ) -> dict[str, list[Document]]:
        """Async :meth:`run`: the model runs on the reranker's worker thread, never the event loop."""
        options, docs = self._prepare(documents, top_k, score_threshold)
        if not docs:
            return {"documents": []}
        reranker = await self._handle.aget()
        ranked = await arank(reranker, query, self.passage_texts(docs), **options)
        return {"documents": [_with_score(docs[r.index], r) for r in ranked]}

    def _prepare(
        self, documents: list[Document], top_k: int | None, score_threshold: float | None
    ) -> tuple[dict[str, Any], list[Document]]:
        top = self.top_k if top_k is None else check_positive_int(top_k, "top_k")
        threshold = self.score_threshold if score_threshold is None else check_score_threshold(score_threshold)
        options = dict(
            top=top,
            score_threshold=threshold,
            instruction=self.instruction,
            ratio=self.ratio,
            evidence=self.evidence,
            prune=self.prune,
            prune_mass=self.prune_mass,
        )
        return options, _deduplicate(documents)


def _with_score(doc: Document, ranked: Ranked) -> Document:
    """A copy of ``doc`` with its score (and ``meta["evidence"]``; pruned ``content`` when asked)."""
    if ranked.evidence is None:
        return replace(doc, score=ranked.score)
    meta = {**doc.meta, "evidence": ranked.evidence_in(doc.content or "")}
    content = doc.content
    if ranked.pruned_text is not None:
        meta["unpruned_content"] = doc.content
        content = ranked.pruned_text
    return replace(doc, score=ranked.score, meta=meta, content=content)


def _deduplicate(documents: list[Document]) -> list[Document]:
    """One document per id, in first-seen order; of duplicates, the one with the highest score stays."""
    best: dict[str, Document] = {}
    for doc in documents:
        kept = best.get(doc.id)
        if kept is None or _score(doc) > _score(kept):
            best[doc.id] = doc
    return list(best.values())


def _score(doc: Document) -> float:
    return float("-inf") if doc.score is None else doc.score
