"""The FastAPI app of ``kalm-rag serve``: Cohere v1/v2 and TEI rerank endpoints, encode, health and metrics.

:func:`create_app` builds it around a :class:`~kalm_rag.Reranker` (or a function that loads one);
:func:`app_from_env` is the factory uvicorn's worker processes call (``kalm-rag serve`` hands them a
:class:`ServeConfig` through the environment).

Every answer that is not a success is JSON, ``{"message", "field", "error_type"}``, with a 4xx status for
bad input (the field named) and never a traceback: 401 without the API key, 413 for a body, a document
list or a document over the limits, 422 for a value the service cannot use, 503 while the model loads or
the server shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kalm_rag._version import __version__
from kalm_rag.engine import Reranker, ScoreRequest
from kalm_rag.errors import InvalidInputError, KalmError, StoreError
from kalm_rag.models import DEFAULT_MODEL
from kalm_rag.serve.batching import DynamicBatcher, ServiceStoppingError, probabilities
from kalm_rag.serve.metrics import CONTENT_TYPE, ServeMetrics
from kalm_rag.serve.schemas import (
    CohereDocument,
    CohereRerankRequest,
    CohereRerankResponse,
    EncodeRequest,
    EncodeResponse,
    ErrorBody,
    Extensions,
    Health,
    TEIRerankRequest,
    TEIResult,
)
from kalm_rag.store import redact_url
from kalm_rag.validation import check_positive_int, check_ratio

logger = logging.getLogger(__name__)

#: Environment variable through which ``kalm-rag serve`` hands its settings to uvicorn's worker processes.
CONFIG_ENV = "KALM_RAG_SERVE_CONFIG"
#: Environment variable holding the API key (``kalm-rag serve --api-key`` sets it for the workers).
API_KEY_ENV = "KALM_RAG_API_KEY"
#: Paths that answer without the API key.
PUBLIC_PATHS = frozenset({"/health"})
#: Paths reported by name in the metrics (anything else is "other", so that random paths add no series).
ENDPOINTS = frozenset(
    {"/v1/rerank", "/v2/rerank", "/rerank", "/v1/encode", "/health", "/metrics", "/docs", "/openapi.json"}
)
#: Passages per pre-encoding step on the model worker: scoring batches run between the steps.
ENCODE_CHUNK = 64

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "Missing or wrong API key"),
        (413, "Body, document count or a document over the server's limits"),
        (422, "A value the service cannot use (the field is named)"),
        (503, "The model is loading, or the server is shutting down"),
    )
}


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
        max_body_bytes: largest request body.
        max_batch_passages: most passages per dynamic batch.
        max_wait_ms: how long a batch waits for more requests.
        batching: ``False`` runs each request alone.
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
    max_body_bytes: int = 8 * 2**20
    max_batch_passages: int = 256
    max_wait_ms: float = 2.0
    batching: bool = True
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


# ----- errors ---------------------------------------------------------------------------------------


class ApiError(KalmError):
    """A request the service answers with ``status`` and a JSON error body naming ``field``."""

    def __init__(self, status: int, message: str, *, field: str | None = None, error_type: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.error_type = error_type


def _error_response(
    status: int,
    message: str,
    *,
    field: str | None = None,
    error_type: str,
    errors: list[dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(message=message, field=field, error_type=error_type, errors=errors)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def _field_path(loc: Sequence[str | int], known: frozenset[str]) -> str | None:
    """``("body", "documents", 3, "text")`` -> ``documents[3].text``; union-member tags pydantic adds are dropped."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in known:
            out += f".{p}" if out else p
        else:
            break  # a tag such as 'str' or 'CohereDocument': the field path ends before it
    return out or ("body" if loc and loc[0] == "body" else None)


_FIELDS = frozenset(
    name
    for model in (CohereRerankRequest, TEIRerankRequest, EncodeRequest, CohereDocument)
    for name in model.model_fields
)


def _validation_response(exc: RequestValidationError) -> JSONResponse:
    by_field: dict[str | None, list[str]] = {}  # a value that fits no member of a union gets one error per member
    for err in exc.errors():
        kind = err.get("type", "")
        field = "body" if kind == "json_invalid" else _field_path(err.get("loc", ()), _FIELDS)
        if kind == "json_invalid":
            reason = "is not valid JSON"
        elif kind == "missing":
            reason = "is required"
        else:
            reason = str(err.get("msg", "invalid value"))
        if reason not in by_field.setdefault(field, []):
            by_field[field].append(reason)
    errors: list[dict[str, Any]] = []
    for field, reasons in by_field.items():
        joiner = " " if len(reasons) == 1 and reasons[0].startswith("is ") else ": "
        errors.append({"field": field, "message": f"{field}{joiner}" + "; or ".join(reasons)})
    if not errors:
        return _error_response(422, "invalid request", error_type="invalid_request")
    return _error_response(
        422, errors[0]["message"], field=errors[0]["field"], error_type="invalid_request", errors=errors
    )


# ----- ASGI middleware ------------------------------------------------------------------------------


async def _send_json(
    send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
            + list(headers),
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _Guard:
    """API key (``Authorization: Bearer KEY``, constant-time) and request body size, before the app reads anything."""

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
            await _send_json(
                send,
                401,
                {
                    "message": "missing or wrong API key: send Authorization: Bearer <key>",
                    "field": "Authorization",
                    "error_type": "unauthorized",
                },
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = {
            "message": f"request body over {self.max_body_bytes} bytes",
            "field": "body",
            "error_type": "payload_too_large",
        }
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send, 413, too_large)
            return
        chunks, size = [], 0
        while True:  # read the body here (bounded), then hand it to the app as one message
            message = await receive()
            if message["type"] != "http.request":
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send_json(send, 413, too_large)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: Message = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([body], receive), send)

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        value = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = value.partition(b" ")
        # compare_digest takes the same time whatever the token; the scheme is not secret
        return hmac.compare_digest(token.strip(), self.api_key) and scheme.lower() == b"bearer"


def _replay(messages: list[Message], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


class _Observe:
    """Counts every answer (by endpoint and status, 401 and 413 included) and times it."""

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


# ----- the service ----------------------------------------------------------------------------------


class _Service:
    """The model, its batcher and the request-level checks shared by the endpoints."""

    def __init__(
        self,
        source: Reranker | Callable[[], Reranker],
        *,
        model_name: str | None,
        metrics: ServeMetrics,
        max_documents: int,
        max_document_chars: int,
        max_batch_passages: int,
        max_wait_ms: float,
        batching: bool,
    ) -> None:
        self._source = source
        self._owns_reranker = not isinstance(source, Reranker)
        self.reranker: Reranker | None = source if isinstance(source, Reranker) else None
        self.model_name = model_name
        self.metrics = metrics
        self.max_documents = max_documents
        self.max_document_chars = max_document_chars
        self._batcher_options: dict[str, Any] = {
            "max_batch_passages": max_batch_passages,
            "max_wait_ms": max_wait_ms,
            "enabled": batching,
        }
        self.batcher: DynamicBatcher | None = None
        self.passage_limit: int | None = None
        self._loading: asyncio.Task[Reranker] | None = None
        if self.reranker is not None:
            self._ready(self.reranker)

    def _ready(self, reranker: Reranker) -> None:
        self.reranker = reranker
        self.batcher = DynamicBatcher(
            reranker,
            on_batch=self.metrics.observe_batch,
            on_queue_depth=self.metrics.queue_depth.set,
            **self._batcher_options,
        )
        # the tokenizer cuts every passage at this many tokens: the model's cap or max_passage_tokens
        long_text = " ".join(["kalm"] * (reranker.max_passage_tokens + 8))
        self.passage_limit = len(reranker.backend.tokenize_passages([long_text], reranker.max_passage_tokens)[0])
        if self.model_name is None:
            self.model_name = f"{reranker.backend.family}:{reranker.backend.weights_id[:12]}"
        self.metrics.model_ready.set(1)

    @property
    def loaded(self) -> bool:
        return self.reranker is not None

    async def load(self) -> Reranker:
        """The reranker, loading it on a thread on the first call (idempotent, concurrent calls share one load)."""
        if self.reranker is not None:
            return self.reranker
        if self._loading is None:
            loader = self._source
            assert callable(loader)
            self._loading = asyncio.get_running_loop().create_task(asyncio.to_thread(loader))
        reranker = await asyncio.shield(self._loading)
        if self.reranker is None:
            self._ready(reranker)
        return reranker

    def start_loading(self) -> None:
        """Begin loading in the background (a mounted app whose lifespan did not run)."""
        if self.reranker is None and self._loading is None:
            task = asyncio.get_running_loop().create_task(self.load())
            task.add_done_callback(_log_failure)

    async def require(self) -> tuple[Reranker, DynamicBatcher]:
        """The loaded reranker and batcher, or 503 while loading."""
        if self.reranker is None or self.batcher is None:
            self.start_loading()
            raise ApiError(503, "the model is loading; retry shortly", error_type="service_unavailable")
        return self.reranker, self.batcher

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
        if self.reranker is not None and self._owns_reranker:
            self.reranker.close()

    # ----- request checks ---------------------------------------------------------------------------

    def texts_of(
        self, documents: Sequence[str | CohereDocument], field: str, rank_fields: Sequence[str] | None = None
    ) -> list[str]:
        """The text scored for each document, with the count and length limits checked."""
        if len(documents) > self.max_documents:
            raise ApiError(
                413,
                f"{field} has {len(documents)} entries; this server takes at most {self.max_documents}",
                field=field,
                error_type="payload_too_large",
            )
        texts = []
        for i, doc in enumerate(documents):
            where = f"{field}[{i}]"
            if isinstance(doc, str):
                text = doc
            elif rank_fields:
                values = doc.model_dump()
                missing = [f for f in rank_fields if values.get(f) is None]
                if len(missing) == len(rank_fields):
                    raise ApiError(422, f"{where} has none of the rank_fields {list(rank_fields)}", field=where)
                text = "\n".join(f"{f}: {values[f]}" for f in rank_fields if values.get(f) is not None)
            else:
                if doc.text is None:
                    raise ApiError(
                        422, f"{where}.text is required (or send the document as a string)", field=f"{where}.text"
                    )
                text, where = doc.text, f"{where}.text"
            if len(text) > self.max_document_chars:
                raise ApiError(
                    413,
                    f"{where} has {len(text)} characters; this server takes at most {self.max_document_chars}",
                    field=where,
                    error_type="payload_too_large",
                )
            if not text.strip():
                raise ApiError(422, f"{where} is empty", field=where)
            texts.append(text)
        if not texts:
            raise ApiError(422, f"{field} is empty", field=field)
        return texts

    def top_n(self, value: int | None, field: str = "top_n") -> int | None:
        if value is None:
            return None
        if value < 1 or value > self.max_documents:
            raise ApiError(422, f"{field} must be in 1..{self.max_documents}, got {value}", field=field)
        return value

    def score_request(self, reranker: Reranker, query: str, texts: list[str], ext: Extensions) -> ScoreRequest:
        """The engine request, every option checked here so that a bad value is named in the answer."""
        if not query.strip():
            raise ApiError(422, "query is empty", field="query")
        for name in ("instruction", "system_instruction"):
            value = getattr(ext, name)
            if value is not None and not value.strip():
                raise ApiError(422, f"{name} is empty", field=name)
        if ext.ratio is not None:
            try:
                check_ratio(ext.ratio)
            except InvalidInputError as exc:
                raise ApiError(422, str(exc), field="ratio") from None
            if ext.ratio % reranker.base_ratio:
                raise ApiError(
                    422,
                    f"ratio must be a multiple of the store's base ratio {reranker.base_ratio}, got {ext.ratio}",
                    field="ratio",
                )
        return ScoreRequest(
            query, texts, instruction=ext.instruction, system_instruction=ext.system_instruction, ratio=ext.ratio
        )

    async def rank(
        self, http: Request, query: str, texts: list[str], ext: Extensions
    ) -> tuple[list[tuple[int, float, float]], int]:
        """``[(index, P(yes), margin)]`` best first (ties keep input order, as ``Reranker.rerank``) and the ratio.

        A request whose client disconnects while it waits is dropped from the queue (not scored).
        """
        reranker, batcher = await self.require()
        job = asyncio.ensure_future(batcher.score(self.score_request(reranker, query, texts, ext)))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job not in done:
            job.cancel()
            raise ApiError(499, "the client closed the connection", error_type="client_closed")
        margins = job.result()
        scores = probabilities(margins)
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        ratio = reranker.ratio if ext.ratio is None else ext.ratio
        return [(i, scores[i], margins[i]) for i in order], ratio

    async def refuse_long_texts(self, texts: list[str], field: str) -> None:
        """422 for the first text the tokenizer would cut at the passage limit (TEI ``truncate: false``).

        A text is cut when its ids at the server's limit differ from its ids with a limit four times larger.
        """
        reranker, batcher = await self.require()
        limit = reranker.max_passage_tokens

        def cut() -> list[bool]:  # on the model worker: the tokenizer is not shared across threads
            short = reranker.backend.tokenize_passages(texts, limit)
            full = reranker.backend.tokenize_passages(texts, 4 * limit)
            return [a != b for a, b in zip(short, full)]

        for i, was_cut in enumerate(await batcher.call(cut)):
            if was_cut:
                raise ApiError(
                    422,
                    f"{field}[{i}] is longer than the model's passage limit of {self.passage_limit} tokens; "
                    "send truncate: true to have it cut",
                    field=f"{field}[{i}]",
                )

    def check_max_tokens(self, value: int | None) -> None:
        if value is None:
            return
        limit = self.passage_limit
        assert limit is not None
        if value < limit:
            raise ApiError(
                422,
                f"max_tokens_per_doc {value} is below this server's passage limit of {limit} tokens: passages are "
                f"encoded and stored at {limit} tokens, so a shorter cut cannot reuse them; omit it or send >= {limit}",
                field="max_tokens_per_doc",
            )

    async def encode(self, texts: list[str]) -> tuple[int, int]:
        """Pre-encode ``texts`` in steps on the model worker; ``(distinct, encoded now)``."""
        reranker, batcher = await self.require()
        distinct = list(dict.fromkeys(texts))
        encoded = 0
        for start in range(0, len(distinct), ENCODE_CHUNK):
            chunk = distinct[start : start + ENCODE_CHUNK]
            encoded += await batcher.call(functools.partial(self._encode_chunk, reranker, chunk))
        return len(distinct), encoded

    def _encode_chunk(self, reranker: Reranker, chunk: list[str]) -> int:
        before = reranker.counters["encoded_passages"]
        try:
            report = reranker.encode(chunk, show_progress_bar=False)  # strict: raises when the store does not keep them
        finally:
            self.metrics.encoded_passages.inc(reranker.counters["encoded_passages"] - before)
        return report.encoded


async def _disconnected(http: Request) -> None:
    """Return once the client has gone (the body is read already: the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("loading the model failed: %s", task.exception())


# ----- the app --------------------------------------------------------------------------------------


def create_app(
    reranker: Reranker | Callable[[], Reranker],
    *,
    api_key: str | None = None,
    model_name: str | None = None,
    max_documents: int = 1000,
    max_document_chars: int = 32_768,
    max_body_bytes: int = 8 * 2**20,
    max_batch_passages: int = 256,
    max_wait_ms: float = 2.0,
    batching: bool = True,
) -> FastAPI:
    """The rerank service as a FastAPI app.

    Mount it in your own ASGI app, or run it with uvicorn (``kalm-rag serve`` does). The model worker
    starts with the app's lifespan, or at the first request when the app is mounted without one.

    Args:
        reranker: a loaded :class:`~kalm_rag.Reranker` (used as given, never closed by the app), or a
            function that loads one (called on a thread at start-up; the app closes what it loaded).
        api_key: when set, every path except ``/health`` needs ``Authorization: Bearer <api_key>``.
        model_name: the name reported in ``/health`` and responses (default: the backend's family and weights).
        max_documents: most documents (or texts) per request; also the largest ``top_n``.
        max_document_chars: longest document, in characters.
        max_body_bytes: largest request body, in bytes.
        max_batch_passages: most passages the model worker coalesces into one batch.
        max_wait_ms: how long the worker waits for more requests before it runs a batch.
        batching: ``False`` runs every request alone, in arrival order.

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
        ("max_body_bytes", max_body_bytes),
        ("max_batch_passages", max_batch_passages),
    ):
        check_positive_int(value, name)
    if api_key is not None and not api_key.strip():
        raise InvalidInputError("api_key is empty; pass None for no key")
    metrics = ServeMetrics()
    service = _Service(
        reranker,
        model_name=model_name,
        metrics=metrics,
        max_documents=max_documents,
        max_document_chars=max_document_chars,
        max_batch_passages=max_batch_passages,
        max_wait_ms=max_wait_ms,
        batching=batching,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.load()
        assert service.batcher is not None
        service.batcher.start()
        try:
            yield
        finally:  # uvicorn has finished the in-flight requests; the queue is drained before the model goes
            await service.close()

    app = FastAPI(
        title="kalm-rag",
        version=__version__,
        summary="FBNL reranking as a service: the Cohere (v1, v2), Jina and TEI rerank APIs.",
        lifespan=lifespan,
    )
    app.state.service = service
    _add_error_handlers(app)
    _add_routes(app, service)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(_Observe, metrics=metrics)  # outermost: it also counts what _Guard refuses
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return _error_response(exc.status, exc.message, field=exc.field, error_type=exc.error_type, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), error_type="http_error")

    @app.exception_handler(ServiceStoppingError)
    async def stopping(request: Request, exc: ServiceStoppingError) -> JSONResponse:
        return _error_response(503, str(exc), error_type="service_unavailable", headers={"Retry-After": "1"})

    @app.exception_handler(InvalidInputError)
    async def invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        return _error_response(422, str(exc), error_type="invalid_request")

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # /v1/encode must not answer 200 with the cache unfilled; scoring never gets here (it recomputes)
        logger.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return _error_response(
            503, f"{type(exc).__name__}: {exc}", error_type="store_unavailable", headers={"Retry-After": "1"}
        )

    @app.exception_handler(KalmError)
    async def kalm_error(request: Request, exc: KalmError) -> JSONResponse:
        logger.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return _error_response(500, f"{type(exc).__name__}: {exc}", error_type="server_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)  # the traceback goes to the log, not the client
        return _error_response(500, "internal server error (see the server log)", error_type="server_error")


def _add_routes(app: FastAPI, service: _Service) -> None:
    async def cohere(http: Request, body: CohereRerankRequest, version: str) -> dict[str, Any]:
        texts = service.texts_of(body.documents, "documents", body.rank_fields)
        top_n = service.top_n(body.top_n)
        await service.require()
        service.check_max_tokens(body.max_tokens_per_doc)
        ranked, ratio = await service.rank(http, body.query, texts, body)
        results = []
        for i, score, _ in ranked[:top_n]:
            result: dict[str, Any] = {"index": i, "relevance_score": score}
            if body.return_documents:
                doc = body.documents[i]
                result["document"] = {"text": doc} if isinstance(doc, str) else doc.model_dump(exclude_none=True)
            results.append(result)
        meta = {"api_version": {"version": version}, "model": service.model_name, "ratio": ratio}
        return {"id": str(uuid.uuid4()), "results": results, "meta": meta}

    @app.post(
        "/v2/rerank",
        response_model=CohereRerankResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
    )
    async def rerank_v2(http: Request, body: CohereRerankRequest) -> dict[str, Any]:
        """Cohere v2 rerank (what ``cohere.ClientV2.rerank``, LangChain's and LlamaIndex's ``CohereRerank`` send)."""
        return await cohere(http, body, "2")

    @app.post(
        "/v1/rerank",
        response_model=CohereRerankResponse,
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
    )
    async def rerank_v1(http: Request, body: CohereRerankRequest) -> dict[str, Any]:
        """Cohere v1 rerank (``cohere.Client.rerank``; Jina's client sends the same shape)."""
        return await cohere(http, body, "1")

    @app.post(
        "/rerank",
        response_model=list[TEIResult],
        response_model_exclude_none=True,
        responses=ERROR_RESPONSES,
        tags=["rerank"],
    )
    async def rerank_tei(http: Request, body: TEIRerankRequest) -> list[dict[str, Any]]:
        """Hugging Face text-embeddings-inference rerank: a list of ``{index, score, text?}``, best first."""
        texts = service.texts_of(body.texts, "texts")
        if body.truncate is False:
            await service.refuse_long_texts(texts, "texts")
        ranked, _ = await service.rank(http, body.query, texts, body)
        out = []
        for i, score, margin in ranked:
            item: dict[str, Any] = {"index": i, "score": margin if body.raw_scores else score}
            if body.return_text:
                item["text"] = body.texts[i]
            out.append(item)
        return out

    @app.post("/v1/encode", response_model=EncodeResponse, responses=ERROR_RESPONSES, tags=["indexing"])
    async def encode(body: EncodeRequest) -> EncodeResponse:
        """Pre-encode documents into the shared store (skipping those already there), so that reranking
        them later runs only the decoder.
        """
        texts = service.texts_of(body.documents, "documents")
        distinct, encoded = await service.encode(texts)
        reranker, _ = await service.require()
        return EncodeResponse(
            documents=len(texts),
            distinct=distinct,
            encoded=encoded,
            already_present=distinct - encoded,
            namespace=reranker.namespace,
        )

    @app.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["service"])
    async def health() -> Any:
        """200 once the model is loaded (503 ``loading`` before); never needs the API key."""
        if not service.loaded:
            service.start_loading()
            return JSONResponse({"status": "loading", "model": service.model_name or ""}, status_code=503)
        assert service.reranker is not None
        return Health(
            status="ok",
            model=service.model_name or "",
            namespace=service.reranker.namespace,
            max_passage_tokens=service.passage_limit,
        )

    @app.get("/metrics", tags=["service"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus text format: requests, latency, batch sizes, queue depth, store hits/misses, encoder work."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)


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
    return create_app(
        config.load_reranker,
        api_key=os.environ.get(API_KEY_ENV) or None,
        model_name=config.model,
        max_documents=config.max_documents,
        max_document_chars=config.max_document_chars,
        max_body_bytes=config.max_body_bytes,
        max_batch_passages=config.max_batch_passages,
        max_wait_ms=config.max_wait_ms,
        batching=config.batching,
    )
