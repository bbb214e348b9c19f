"""The FastAPI app of ``kalm-rag serve``: Cohere v1/v2 and TEI rerank endpoints, encode, health and metrics.

:func:`create_app` builds it around a :class:`~kalm_rag.Reranker` (or a function that loads one);
:func:`app_from_env` is the factory uvicorn's worker processes call (``kalm-rag serve`` hands them a
:class:`ServeConfig` through the environment).

The pieces, one idea each: :mod:`~kalm_rag.serve.config` (settings), :mod:`~kalm_rag.serve.middleware`
(request ids, metrics, API key, body limits), :mod:`~kalm_rag.serve.errors` (the one error shape),
:mod:`~kalm_rag.serve.checks` (limits on a request), :mod:`~kalm_rag.serve.service` (loading the model and
the work on it), :mod:`~kalm_rag.serve.routes` (the endpoints).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from types import FrameType

from fastapi import FastAPI

from kalm_rag._version import __version__
from kalm_rag.engine import Reranker
from kalm_rag.errors import InvalidInputError
from kalm_rag.serve.checks import RequestChecks
from kalm_rag.serve.config import API_KEY_ENV, CONFIG_ENV, ServeConfig
from kalm_rag.serve.errors import ERROR_RESPONSES, ApiError, add_error_handlers
from kalm_rag.serve.metrics import ServeMetrics
from kalm_rag.serve.middleware import ENDPOINTS, PUBLIC_PATHS, Guard, Observe
from kalm_rag.serve.routes import add_routes
from kalm_rag.serve.service import Service
from kalm_rag.validation import check_positive_int

__all__ = [
    "API_KEY_ENV",
    "CONFIG_ENV",
    "ENDPOINTS",
    "ERROR_RESPONSES",
    "PUBLIC_PATHS",
    "ApiError",
    "ServeConfig",
    "app_from_env",
    "create_app",
]

logger = logging.getLogger("kalm_rag.serve")

#: Passages per encoding step on the model worker (``/v1/encode``, and the misses of a large rerank request):
#: other requests' batches run between the steps.
ENCODE_CHUNK = 64


def create_app(
    reranker: Reranker | Callable[[], Reranker],
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_documents: int = 1000,
    max_document_chars: int = 32_768,
    max_query_chars: int = 8192,
    max_body_bytes: int = 8 * 2**20,
    max_batch_passages: int = 256,
    max_wait_ms: float = 2.0,
    batching: bool = True,
    request_timeout_s: float = 300.0,
    body_timeout_s: float = 10.0,
    encode_chunk: int = ENCODE_CHUNK,
) -> FastAPI:
    """The rerank service as a FastAPI app.

    Mount it in your own ASGI app, or run it with uvicorn (``kalm-rag serve`` does). The model worker
    starts with the app's lifespan, or at the first request when the app is mounted without one.

    Args:
        reranker: a loaded :class:`~kalm_rag.Reranker` (used as given, never closed by the app), or a
            function that loads one (called on a thread in the background from start-up, retried after a
            failure; the app closes what it loaded).
        api_key: when set, every path except ``/health`` needs ``Authorization: Bearer <api_key>``.
        model_name: the name reported in ``/health`` and responses (default: the backend's family and weights).
        max_documents: most documents (or texts) per request; also the largest ``top_n``.
        max_document_chars: longest document, in characters.
        max_query_chars: longest query, instruction or system instruction, in characters.
        max_body_bytes: largest request body, in bytes.
        max_batch_passages: most passages the model worker coalesces into one batch.
        max_wait_ms: how long the worker waits for more requests before it runs a batch.
        batching: ``False`` runs every request alone, in arrival order.
        request_timeout_s: deadline of each piece of model work a request waits for (503 past it).
        body_timeout_s: how long a client may take to send its whole body (408 past it).
        encode_chunk: passages per encoding step on the model worker.

    Returns:
        The app: ``POST /v2/rerank``, ``/v1/rerank``, ``/rerank``, ``/v1/encode``; ``GET /health``,
        ``/metrics``, ``/docs``.

    Example:
        >>> from kalm_rag import Reranker  # doctest: +SKIP
        >>> app = create_app(Reranker.from_pretrained("kalm-mini"), api_key="secret")  # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8080)
    """
    if reranker is None or not (isinstance(reranker, Reranker) or callable(reranker)):
        raise InvalidInputError(f"reranker must be a Reranker or a function returning one, got {reranker!r}")
    for name, value in (
        ("max_documents", max_documents),
        ("max_document_chars", max_document_chars),
        ("max_query_chars", max_query_chars),
        ("max_body_bytes", max_body_bytes),
        ("max_batch_passages", max_batch_passages),
        ("encode_chunk", encode_chunk),
    ):
        check_positive_int(value, name)
    for name, seconds in (("request_timeout_s", request_timeout_s), ("body_timeout_s", body_timeout_s)):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
            raise InvalidInputError(f"{name} must be a number of seconds > 0, got {seconds!r}")
    if api_key is not None and not api_key.strip():
        raise InvalidInputError("api_key is empty; pass None for no key")
    metrics = ServeMetrics()
    service = Service(
        reranker,
        model_name=model_name,
        metrics=metrics,
        encode_chunk=encode_chunk,
        batcher_options={
            "max_batch_passages": max_batch_passages,
            "max_wait_ms": max_wait_ms,
            "enabled": batching,
            "timeout_s": float(request_timeout_s),
        },
    )
    checks = RequestChecks(
        max_documents=max_documents, max_document_chars=max_document_chars, max_query_chars=max_query_chars
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start_loading()  # in the background: /health answers (loading, error, ok) meanwhile
        if service.batcher is not None:
            service.batcher.start()
        try:
            yield
        finally:  # uvicorn has finished (or cancelled) the requests; the queue is drained before the model goes
            await service.close()

    app = FastAPI(
        title="kalm-rag",
        version=__version__,
        summary="FBNL reranking as a service: the Cohere (v1, v2), Jina and TEI rerank APIs.",
        lifespan=lifespan,
    )
    app.state.service = service
    add_error_handlers(app)
    add_routes(app, service, checks)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, body_timeout_s=float(body_timeout_s))
    app.add_middleware(Observe, metrics=metrics)  # outermost: request ids, and it counts what Guard refuses
    return app


# ----- uvicorn's worker processes -------------------------------------------------------------------


def app_from_env() -> FastAPI:
    """The app of one ``kalm-rag serve`` worker process: :class:`ServeConfig` from :data:`CONFIG_ENV`, the API
    key from :data:`API_KEY_ENV` (uvicorn calls this factory in each worker).
    """
    raw = os.environ.get(CONFIG_ENV)
    config = ServeConfig.from_json(raw) if raw else ServeConfig()
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    _exit_cleanly_on_sigterm()
    return create_app(
        config.load_reranker,
        api_key=os.environ.get(API_KEY_ENV) or None,
        model_name=config.model,
        max_documents=config.max_documents,
        max_document_chars=config.max_document_chars,
        max_query_chars=config.max_query_chars,
        max_body_bytes=config.max_body_bytes,
        max_batch_passages=config.max_batch_passages,
        max_wait_ms=config.max_wait_ms,
        batching=config.batching,
        request_timeout_s=config.request_timeout_s,
        body_timeout_s=config.body_timeout_s,
    )


def _exit_cleanly_on_sigterm() -> None:
    """After a graceful stop on SIGTERM, let the process end normally (status 0) instead of by the signal.

    uvicorn records the signal and raises it again once it has shut down, so the process dies by SIGTERM:
    without ``atexit``, which leaks the semaphores of its worker processes, and with another status than a
    ``--workers 2`` supervisor, which exits 0. uvicorn calls this factory inside its signal capture (the
    installed handler is its server's ``handle_exit``): the handler installed here starts the same graceful
    shutdown without recording the signal.
    """
    handler = signal.getsignal(signal.SIGTERM)
    server = getattr(handler, "__self__", None)
    if server is None or type(server).__module__ != "uvicorn.server" or not hasattr(server, "should_exit"):
        return

    def graceful(sig: int, frame: FrameType | None) -> None:
        server.should_exit = True

    signal.signal(signal.SIGTERM, graceful)
