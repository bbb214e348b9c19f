"""Fields shared by the LlamaIndex postprocessor and encoder: which reranker, on which store, and the
passage text of a node.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_serializer,
    field_validator,
)
from llama_index.core.schema import BaseNode, MetadataMode

from kalm_rag import PassageStore, Reranker
from kalm_rag.adapters import (
    DEFAULT_MODEL,
    DEFAULT_STORE_URL,
    RerankerHandle,
    as_kalm_error,
    check_title_key,
    document_text,
    handle_from_fields,
    store_url,
)


def node_text(node: BaseNode, title_key: str | None = None) -> str | None:
    """The passage text of a node: its content without metadata (the same text in every framework), with the
    title from ``node.metadata[title_key]`` in front when ``title_key`` is set (``kalm_rag.index.passage_text``).
    """
    return document_text(node.get_content(metadata_mode=MetadataMode.NONE), node.metadata, title_key)


class KaLMEngineConfig(BaseModel):
    """Either a ready ``reranker``, or ``model`` + ``store`` (+ ``device``, ``batch_size``) to load one.

    Components configured with the same model and store URL share one loaded model and one cache.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    reranker: Reranker | None = Field(
        default=None, description="A ready kalm_rag.Reranker; mutually exclusive with model/store/device/batch_size."
    )
    model: str = Field(default=DEFAULT_MODEL, description="Checkpoint folder, hub id or 'kalm-mini'.")
    store: PassageStore | str = Field(
        default=DEFAULT_STORE_URL, description="Passage store object or URL (memory://, sqlite:///path, redis://...)."
    )
    device: str | None = Field(default=None, description="Torch device; None: CUDA when available.")
    batch_size: int = Field(default=32, description="Passages per encoder or decoder batch.")
    storage: str | None = Field(
        default=None,
        description="How passage vectors are stored (float32, bfloat16, int8, res4, res2, res1); None: the "
        "store's recorded setting for the model, else the model's default.",
    )
    title_key: str | None = Field(
        default=None,
        description="Metadata key of a title put before the node text (kalm_rag.index.passage_text); None: the "
        "text alone. Use the same setting as kalm-rag index --title-field.",
    )

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

    @field_serializer("reranker")
    def _serialize_reranker(self, reranker: Reranker | None) -> str | None:
        return None if reranker is None else reranker.namespace  # e.g. "t5gemma2:<settings digest>"

    @field_serializer("store")
    def _serialize_store(self, store: PassageStore | str) -> str:
        return store_url(store) or f"<{type(store).__name__} at {id(store):#x}>"

    def get_reranker(self) -> Reranker:
        """The ``kalm_rag.Reranker`` in use, loading the model on the first call."""
        return self._handle.get()
