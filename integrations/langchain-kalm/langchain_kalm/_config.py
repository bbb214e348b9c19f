"""Fields shared by the LangChain compressor and encoder: which reranker, on which store."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.documents import Document
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from kalm_rag import PassageStore, Reranker
from kalm_rag.adapters import (
    DEFAULT_MODEL,
    DEFAULT_STORE_URL,
    RerankerHandle,
    as_kalm_error,
    check_title_key,
    document_text,
    handle_from_fields,
)


class KaLMEngineConfig(BaseModel):
    """Either a ready ``reranker``, or ``model`` + ``store`` (+ ``device``, ``batch_size``) to load one.

    Adapters configured with the same model and store URL share one loaded model and one cache.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    reranker: Reranker | None = Field(default=None, exclude=True)
    """A ready ``kalm_rag.Reranker`` (its store is used); mutually exclusive with the loading fields."""
    model: str = DEFAULT_MODEL
    """Checkpoint folder, hub id (``KaLM-Embedding/KaLM-Reranker-V1-Nano``) or ``"kalm-mini"``."""
    store: PassageStore | str = Field(default=DEFAULT_STORE_URL, exclude=True)
    """Passage store object or URL (``memory://``, ``sqlite:///path``, ``redis://host:port/db``)."""
    device: str | None = None
    """Torch device (``cpu``, ``cuda``); ``None``: CUDA when available."""
    batch_size: int = 32
    """Passages per encoder or decoder batch."""
    storage: str | None = None
    """How passage vectors are stored: ``float32``, ``bfloat16``, ``int8``, ``res4``, ``res2`` or ``res1``;
    ``None``: the store's recorded setting for the model (as ``kalm-rag index`` wrote it), else the model's."""
    title_key: str | None = None
    """Metadata key of a title to put before ``page_content`` (``kalm_rag.index.passage_text``); ``None``: the
    text alone. Use the same setting as ``kalm-rag index --title-field`` so that indexed passages are hits."""

    _handle: RerankerHandle = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:  # every refusal is a KalmError: the one raised while building, or an
            raise as_kalm_error(exc) from exc  # InvalidInputError with pydantic's message (a wrong field type)

    def model_post_init(self, context: Any, /) -> None:
        self._handle = handle_from_fields(self, self.model_fields_set)

    @field_validator("title_key", mode="before")
    @classmethod
    def _check_title_key(cls, value: Any) -> str | None:
        return check_title_key(value)

    def passage_texts(self, documents: Sequence[Document]) -> list[str | None]:
        """The passage text of each document: ``page_content``, with its title in front when ``title_key`` is set."""
        return [document_text(d.page_content, d.metadata, self.title_key) for d in documents]

    def get_reranker(self) -> Reranker:
        """The ``kalm_rag.Reranker`` in use, loading the model on the first call."""
        return self._handle.get()
