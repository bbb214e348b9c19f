"""The service's error answers: one JSON shape for every status, details in the log, never in the body.

Every answer that is not a success is ``{"message", "field", "error_type", "request_id"}`` (plus ``errors``, one
per field, for schema errors). A message names what the *client* sent and can fix; what went wrong inside the
server (a store's file path, an exception's text) goes to the server log under the same request id, which the
answer carries in its body and in the ``X-Request-ID`` header.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Scope

from kalm_rag.errors import InvalidInputError, KalmError, StoreError
from kalm_rag.serve.batching import ModelWorkerError, RequestTimeoutError, ServiceStoppingError
from kalm_rag.serve.schemas import CohereDocument, CohereRerankRequest, EncodeRequest, ErrorBody, TEIRerankRequest

logger = logging.getLogger("kalm_rag.serve")

#: Header that carries the request id (taken from the request when it is a short token, else made up).
REQUEST_ID_HEADER = "x-request-id"

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in (
        (401, "Missing or wrong API key"),
        (408, "The request body did not arrive in time"),
        (413, "Body, document count, a document, the query or the instruction over the server's limits"),
        (422, "A value the service cannot use, or a body that is not JSON (the field is named)"),
        (500, "The server failed (details in its log, under the request id)"),
        (503, "The model is loading or failed to load, the store is unavailable, or the server is shutting down"),
    )
}


class ApiError(KalmError):
    """A request the service answers with ``status`` and a JSON error body naming ``field``."""

    def __init__(self, status: int, message: str, *, field: str | None = None, error_type: str = "invalid_request"):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.error_type = error_type


def request_id(scope: Scope) -> str | None:
    """The id :class:`~kalm_rag.serve.middleware.Observe` gave this request."""
    state = scope.get("state")
    return state.get("request_id") if isinstance(state, dict) else None


def error_body(
    message: str,
    *,
    error_type: str,
    field: str | None = None,
    request_id: str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The JSON body of every error answer."""
    body = ErrorBody(message=message, field=field, error_type=error_type, request_id=request_id, errors=errors)
    return body.model_dump(exclude_none=True)


def error_response(
    request: Request,
    status: int,
    message: str,
    *,
    error_type: str,
    field: str | None = None,
    errors: list[dict[str, Any]] | None = None,
) -> JSONResponse:
    """``status`` with :func:`error_body` (``Retry-After: 1`` on a 503: the condition passes)."""
    headers = {"Retry-After": "1"} if status == 503 else None
    rid = request_id(request.scope)
    body = error_body(message, error_type=error_type, field=field, request_id=rid, errors=errors)
    return JSONResponse(body, status_code=status, headers=headers)


# ----- schema and parse errors ------------------------------------------------------------------------


_FIELDS = frozenset(
    name
    for model in (CohereRerankRequest, TEIRerankRequest, EncodeRequest, CohereDocument)
    for name in model.model_fields
)


def field_path(loc: Sequence[str | int], known: frozenset[str] = _FIELDS) -> str | None:
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


def body_not_json(request: Request, reason: str) -> JSONResponse:
    """The one answer to a body that cannot be read as JSON: 422, ``field: body``, whatever the reason."""
    message = f"body {reason}"
    return error_response(
        request, 422, message, field="body", error_type="invalid_json", errors=[{"field": "body", "message": message}]
    )


def parse_failure_reason(cause: BaseException | None) -> str:
    """Why FastAPI could not parse a body (it answers these with a bare 400): said in the client's terms."""
    if isinstance(cause, UnicodeDecodeError):
        return "is not UTF-8 text"
    if isinstance(cause, RecursionError):
        return "is nested too deeply to read"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "holds a number too long to read"
    return "is not valid JSON"


def validation_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field pydantic refused (a body that is not JSON: :func:`body_not_json`)."""
    by_field: dict[str | None, list[str]] = {}  # a value that fits no member of a union gets one error per member
    for err in exc.errors():
        kind = err.get("type", "")
        if kind == "json_invalid":
            return body_not_json(request, "is not valid JSON")
        field = field_path(err.get("loc", ()))
        reason = "is required" if kind == "missing" else str(err.get("msg", "invalid value"))
        if reason not in by_field.setdefault(field, []):
            by_field[field].append(reason)
    errors: list[dict[str, Any]] = []
    for field, reasons in by_field.items():
        joiner = " " if len(reasons) == 1 and reasons[0].startswith("is ") else ": "
        errors.append({"field": field, "message": f"{field}{joiner}" + "; or ".join(reasons)})
    if not errors:
        return error_response(request, 422, "invalid request", error_type="invalid_request")
    return error_response(
        request, 422, errors[0]["message"], field=errors[0]["field"], error_type="invalid_request", errors=errors
    )


# ----- the handlers ---------------------------------------------------------------------------------------


def _log(request: Request, exc: BaseException, *, traceback: bool = False) -> None:
    rid = request_id(request.scope)
    log = logger.exception if traceback else logger.error
    log("request %s on %s failed: %s: %s", rid, request.url.path, type(exc).__name__, exc)


def add_error_handlers(app: FastAPI) -> None:
    """Map every exception to :func:`error_response`; anything not caused by the request is logged, not told."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request, exc.status, exc.message, field=exc.field, error_type=exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_response(request, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI could not parse the body
            return body_not_json(request, parse_failure_reason(exc.__cause__))
        return error_response(request, exc.status_code, str(exc.detail), error_type="http_error")

    @app.exception_handler(ServiceStoppingError)
    async def stopping(request: Request, exc: ServiceStoppingError) -> JSONResponse:
        return error_response(request, 503, "the server is shutting down; retry", error_type="service_unavailable")

    @app.exception_handler(ModelWorkerError)
    async def worker_failed(request: Request, exc: ModelWorkerError) -> JSONResponse:
        _log(request, exc)
        return error_response(request, 503, "the model worker failed and restarts; retry", error_type="worker_failed")

    @app.exception_handler(RequestTimeoutError)
    async def timed_out(request: Request, exc: RequestTimeoutError) -> JSONResponse:
        _log(request, exc)
        return error_response(request, 503, "the model worker did not answer in time; retry", error_type="timeout")

    @app.exception_handler(InvalidInputError)
    async def invalid(request: Request, exc: InvalidInputError) -> JSONResponse:
        # the engine's checks name what the request sent (a query, a passage); nothing of the server's
        return error_response(request, 422, str(exc), error_type="invalid_request")

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        # /v1/encode must not answer 200 with the cache unfilled; scoring never gets here (it recomputes)
        _log(request, exc)
        return error_response(
            request, 503, "the passage store is unavailable; retry shortly", error_type="store_unavailable"
        )

    @app.exception_handler(KalmError)
    async def kalm_error(request: Request, exc: KalmError) -> JSONResponse:
        _log(request, exc)
        return error_response(request, 500, "the server could not answer this request", error_type="server_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        _log(request, exc, traceback=True)  # the traceback goes to the log, not the client
        return error_response(request, 500, "the server could not answer this request", error_type="server_error")


def json_bytes(body: dict[str, Any]) -> bytes:
    """``body`` as the bytes of a JSON answer."""
    return json.dumps(body).encode()
