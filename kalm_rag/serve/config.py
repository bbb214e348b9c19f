"""The settings of ``kalm-rag serve``, and how they reach uvicorn's worker processes (the environment)."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass

from kalm_rag.engine import Reranker
from kalm_rag.models import DEFAULT_MODEL
from kalm_rag.store import redact_url

logger = logging.getLogger("kalm_rag.serve")

#: Environment variable through which ``kalm-rag serve`` hands its settings to uvicorn's worker processes.
CONFIG_ENV = "KALM_RAG_SERVE_CONFIG"
#: Environment variable holding the API key (``kalm-rag serve --api-key`` sets it for the workers).
API_KEY_ENV = "KALM_RAG_API_KEY"


@dataclass
class ServeConfig:
    """Settings of ``kalm-rag serve`` (the model to load and the service's limits).

    Attributes:
        model: ``kalm-mini``, a checkpoint folder or a hub id.
        store: store URL shared by the workers (``sqlite:///passages.db``, ``redis://...``); ``None`` is a
            per-process memory store.
        ratio: default MEP ratio.
        device: torch device (default: CUDA when available).
        dtype: ``float32`` or ``bfloat16``.
        batch_size: passages per encoder or decoder call.
        threads: torch threads per worker process (``None``: torch's default).
        max_documents: most documents per request.
        max_document_chars: longest document, in characters.
        max_query_chars: longest query, instruction or system instruction, in characters.
        max_body_bytes: largest request body.
        max_batch_passages: most passages per dynamic batch.
        max_wait_ms: how long a batch waits for more requests.
        batching: ``False`` runs each request alone.
        request_timeout_s: deadline of each piece of model work a request waits for.
        body_timeout_s: how long a client may take to send its whole request body.
        storage: how passage vectors are stored (``float32``, ``res4``, ...); ``None``: the store's recorded
            setting for the model (what ``kalm-rag index`` wrote), else the model's default. The base ratio and
            passage length are always the store's recorded ones (else the defaults).
    """

    model: str = DEFAULT_MODEL
    store: str | None = None
    ratio: int = 4
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 32
    threads: int | None = None
    max_documents: int = 1000
    max_document_chars: int = 32_768
    max_query_chars: int = 8192
    max_body_bytes: int = 8 * 2**20
    max_batch_passages: int = 256
    max_wait_ms: float = 2.0
    batching: bool = True
    request_timeout_s: float = 300.0
    body_timeout_s: float = 10.0
    storage: str | None = None

    def to_json(self) -> str:
        """The settings as JSON (what the worker processes read from :data:`CONFIG_ENV`)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeConfig:
        """Settings from :meth:`to_json`'s output."""
        return cls(**json.loads(text))

    def load_reranker(self) -> Reranker:
        """Load the model with these settings (warns when the store holds nothing for the model)."""
        reranker = Reranker.from_pretrained(
            self.model,
            store=self.store,
            ratio=self.ratio,
            device=self.device,
            dtype=self.dtype,
            batch_size=self.batch_size,
            storage=self.storage,
        )
        if self.store is not None and reranker.settings_source == "defaults":
            logger.warning(
                "the store %s holds no passage vectors of this model (nothing was indexed into it with it): every "
                "passage is encoded at request time until it is stored; index a corpus first with "
                "kalm-rag index CORPUS --store ...",
                redact_url(self.store),
            )
        return reranker
