"""kalm-rag serve: the reranker as an HTTP service that speaks the Cohere (v1, v2), Jina and TEI rerank APIs.

``kalm-rag serve`` runs it with uvicorn; :func:`create_app` builds the FastAPI app for callers who mount it
in their own ASGI application. Concurrent requests are coalesced by one model worker per process
(:class:`~kalm_rag.serve.batching.DynamicBatcher`); worker processes share the passage store by URL.

Needs the ``serve`` extra (``pip install "kalm-rag[serve]"``: FastAPI, uvicorn, prometheus-client).
The engine never imports this package.
"""

from __future__ import annotations

from kalm_rag.errors import MissingDependencyError

try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by the packaging test without the extra
    raise MissingDependencyError(
        f'kalm-rag serve needs the serve extra: pip install "kalm-rag[serve]" ({exc.name} is missing)'
    ) from exc

from kalm_rag.serve.app import ServeConfig, create_app
from kalm_rag.serve.batching import DynamicBatcher

__all__ = ["DynamicBatcher", "ServeConfig", "create_app"]
