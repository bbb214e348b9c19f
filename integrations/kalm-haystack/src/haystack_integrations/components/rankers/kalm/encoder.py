"""``KaLMPassageEncoder``: the indexing half of the Haystack adapter.

FBNL is fast only when passages are encoded before queries arrive. Put this component in the indexing
pipeline before the ``DocumentWriter``; :class:`~.ranker.KaLMRanker` on the same model and store then finds
the documents in the cache and runs only the decoder.
"""

import dataclasses
from pathlib import Path
from typing import Any

from haystack import Document, component, default_from_dict, default_to_dict
from haystack.utils import ComponentDevice, Secret

from haystack_integrations.components.rankers.kalm._base import KaLMComponentBase, deserialize_store
from kalm_rag import EncodeReport, InvalidInputError, PassageStore
from kalm_rag.adapters import DEFAULT_MODEL, DEFAULT_STORE_URL, aencode, encode


@component
class KaLMPassageEncoder(KaLMComponentBase):
    """Pre-encodes ``Document.content`` into the passage store and outputs the documents unchanged.

    ### Usage example

    ```python
    from haystack import Pipeline
    from haystack.components.writers import DocumentWriter
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from haystack_integrations.components.rankers.kalm import KaLMPassageEncoder

    indexing = Pipeline()
    indexing.add_component("kalm", KaLMPassageEncoder(model="KaLM-Embedding/KaLM-Reranker-V1-Nano"))
    indexing.add_component("writer", DocumentWriter(document_store=InMemoryDocumentStore()))
    indexing.connect("kalm.documents", "writer.documents")
    ```
    """

    def __init__(
        self,
        *,
        model: str | Path = DEFAULT_MODEL,
        store: str | PassageStore | Secret = DEFAULT_STORE_URL,
        device: ComponentDevice | None = None,
        batch_size: int = 32,
        strict: bool = True,
        title_key: str | None = None,
        storage: str | None = None,
    ) -> None:
        """Create a KaLMPassageEncoder; the model is loaded by :meth:`warm_up` (or the first run), not here.

        :param model:
            Checkpoint folder, hub id or ``"kalm-mini"``; must match the ranker's.
        :param store:
            Passage store URL, ``Secret`` holding the URL (for one with credentials) or object; must be the
            ranker's store.
        :param device:
            The device to run on; ``None``: CUDA when available, else CPU.
        :param batch_size:
            Passages per encoder batch.
        :param strict:
            Raise ``kalm_rag.errors.NotStoredError`` when the store does not keep the encoded passages (full
            disk, Redis down or full), so that an indexing pipeline never succeeds with the cache unfilled;
            ``False`` lets the documents through and reports it in the ``report`` output.
        :param title_key:
            Metadata key of a title put before ``content`` (``kalm_rag.index.passage_text``); ``None``: the text
            alone. Must match the ranker's, and ``kalm-rag index --title-field``.
        :param storage:
            How passage vectors are stored (``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2``, ``res1``);
            ``None``: the store's recorded setting for the model (as ``kalm-rag index`` wrote it), else the
            model's default.
        """
        # explicit base call: @component rebuilds the class, which breaks zero-argument super()
        KaLMComponentBase.__init__(
            self, model=model, store=store, device=device, batch_size=batch_size, title_key=title_key, storage=storage
        )
        if not isinstance(strict, bool):
            raise InvalidInputError(f"strict must be True or False, got {strict!r}")
        self.strict = strict

    def to_dict(self) -> dict[str, Any]:
        """Serialize the component to a dictionary of basic types."""
        return default_to_dict(self, **self._base_init_parameters(), strict=self.strict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KaLMPassageEncoder":
        """Deserialize the component from a dictionary."""
        return default_from_dict(cls, deserialize_store(data))

    @component.output_types(documents=list[Document], report=dict[str, Any])
    def run(self, documents: list[Document]) -> dict[str, Any]:
        """Encode the documents not yet in the store.

        :param documents:
            Documents to pre-encode; those without ``content`` are skipped.
        :returns:
            ``documents``: the input documents, unchanged; ``report``: the engine's ``EncodeReport`` as a dict
            (``passages``, ``already_present``, ``encoded``, ``stored``, ``not_stored``, ``errors``).
        :raises NotStoredError:
            ``strict`` and the store did not keep some passages.
        """
        report = EncodeReport()
        if documents:
            report = encode(self.get_reranker(), self.passage_texts(documents), strict=self.strict)
        return {"documents": documents, "report": dataclasses.asdict(report)}

    @component.output_types(documents=list[Document], report=dict[str, Any])
    async def run_async(self, documents: list[Document]) -> dict[str, Any]:
        """Async :meth:`run`: encoding runs on the reranker's worker thread, never the event loop."""
        report = EncodeReport()
        if documents:
            report = await aencode(await self._handle.aget(), self.passage_texts(documents), strict=self.strict)
        return {"documents": documents, "report": dataclasses.asdict(report)}
