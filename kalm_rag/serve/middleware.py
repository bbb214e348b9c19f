"""ASGI middleware of the service: request ids and metrics (outermost), then the API key and the body limits.

Both answer in the service's one error shape (:mod:`kalm_rag.serve.errors`) without reaching FastAPI: a
refused request never costs a body parse.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kalm_rag.serve.errors import REQUEST_ID_HEADER, error_body, json_bytes, request_id
from kalm_rag.serve.metrics import ServeMetrics

logger = logging.getLogger("kalm_rag.serve")

#: Paths that answer without the API key.
PUBLIC_PATHS = frozenset({"/health"})
#: Paths reported by name in the metrics (anything else is "other", so that random paths add no series).
ENDPOINTS = frozenset(
    {"/v1/rerank", "/v2/rerank", "/rerank", "/v1/encode", "/health", "/metrics", "/docs", "/openapi.json"}
)
#: A request id a client may choose (anything else is replaced by a fresh one, so that logs stay clean).
_CLIENT_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")


async def send_json(send: Send, status: int, body: dict[str, Any], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    """Send a whole JSON answer."""
    payload = json_bytes(body)
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": start_headers + list(headers)})
    await send({"type": "http.response.body", "body": payload})


class Observe:
    """Gives each request an id (``X-Request-ID``), counts every answer by endpoint and status, and times it.

    A request that uvicorn cancels (the graceful shutdown timed out) before it was answered gets the
    documented JSON 503 here, instead of uvicorn's plain-text 500.
    """

    def __init__(self, app: ASGIApp, *, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = rid
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = 0

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        except asyncio.CancelledError:
            if status:
                raise
            logger.warning("request %s on %s cancelled at shutdown: answered 503", rid, path)
            await send_json(
                observed_send,
                503,
                error_body("the server is shutting down; retry", error_type="service_unavailable", request_id=rid),
                [(b"retry-after", b"1")],
            )
        finally:
            self.metrics.requests.labels(endpoint, str(status or 500)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def _request_id(scope: Scope) -> str:
    given = dict(scope.get("headers", [])).get(REQUEST_ID_HEADER.encode())
    if given is not None and _CLIENT_ID.fullmatch(given):
        return given.decode()
    return uuid.uuid4().hex


class Guard:
    """API key (``Authorization: Bearer KEY``, constant-time), then the request body: at most ``max_body_bytes``,
    all of it within ``body_timeout_s`` (a client that stalls half-way gets 408 and cannot hold the server).
    """

    def __init__(self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, body_timeout_s: float) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection scope."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        rid = request_id(scope)
        if self.api_key is not None and path not in PUBLIC_PATHS and not self._authorized(scope):
            body = error_body(
                "missing or wrong API key: send Authorization: Bearer <key>",
                field="Authorization",
                error_type="unauthorized",
                request_id=rid,
            )
            await send_json(send, 401, body, [(b"www-authenticate", b"Bearer")])
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = error_body(
            f"request body over {self.max_body_bytes} bytes",
            field="body",
            error_type="payload_too_large",
            request_id=rid,
        )
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await send_json(send, 413, too_large)
            return
        try:
            async with asyncio.timeout(self.body_timeout_s):
                messages = await self._read_body(receive)
        except TimeoutError:
            logger.info("request %s on %s: the body did not arrive within %g s", rid, path, self.body_timeout_s)
            late = error_body(
                f"the request body did not arrive within {self.body_timeout_s:g} s",
                field="body",
                error_type="request_timeout",
                request_id=rid,
            )
            await send_json(send, 408, late, [(b"connection", b"close")])
            return
        if messages is None:
            await send_json(send, 413, too_large)
            return
        await self.app(scope, _replay(messages, receive), send)

    async def _read_body(self, receive: Receive) -> list[Message] | None:
        """The body as one message (``None`` when it is over the limit); a disconnect is passed on as it came."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return [message]
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

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
