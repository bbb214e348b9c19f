"""The model behind the endpoints: loading it (with retries), its batcher, and the model work requests ask for.

Loading runs on a thread in the background; ``/health`` says ``loading`` meanwhile, ``error`` after a failed
attempt, and a new attempt follows after a back-off (1 s, doubling up to a minute), so that a store or hub that
was briefly unreachable at start-up does not need a restart. Model work goes through the
:class:`~kalm_rag.serve.batching.DynamicBatcher`; large requests are cut into steps there, so that they never
hold the only model worker for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from fastapi import Request

from kalm_rag.engine import Reranker, ScoreRequest
from kalm_rag.serve.batching import DynamicBatcher
from kalm_rag.serve.errors import ApiError
from kalm_rag.serve.metrics import ServeMetrics
from kalm_rag.store.base import passage_key

logger = logging.getLogger("kalm_rag.serve")

#: Seconds before the first retry of a failed load; each failure doubles it, up to LOAD_RETRY_MAX_S.
LOAD_RETRY_S = 1.0
LOAD_RETRY_MAX_S = 60.0


class Service:
    """The model, its batcher, and the model-side work shared by the endpoints."""

    def __init__(
        self,
        source: Reranker | Callable[[], Reranker],
        *,
        model_name: str | None,
        metrics: ServeMetrics,
        encode_chunk: int,
        batcher_options: dict[str, Any],
    ) -> None:
        self._source = source
        self._owns_reranker = not isinstance(source, Reranker)
        self.reranker: Reranker | None = None
        self.model_name = model_name
        self.metrics = metrics
        self.encode_chunk = encode_chunk
        self._batcher_options = batcher_options
        self.batcher: DynamicBatcher | None = None
        self.passage_limit: int | None = None
        self.load_failures = 0
        self._loading: asyncio.Task[None] | None = None
        self._retry: asyncio.TimerHandle | None = None
        if isinstance(source, Reranker):
            self._ready(source)

    # ----- loading ------------------------------------------------------------------------------------

    def _ready(self, reranker: Reranker) -> None:
        self.reranker = reranker
        self.batcher = DynamicBatcher(
            reranker,
            on_batch=self.metrics.observe_batch,
            on_queue_depth=self.metrics.queue_depth.set,
            **self._batcher_options,
        )
        self.passage_limit = passage_token_limit(reranker)
        if self.model_name is None:
            self.model_name = f"{reranker.backend.family}:{reranker.backend.weights_id[:12]}"
        self.metrics.model_ready.set(1)

    @property
    def loaded(self) -> bool:
        """Whether the model is loaded."""
        return self.reranker is not None

    @property
    def loading(self) -> bool:
        """Whether a load attempt is running now."""
        return self._loading is not None and not self._loading.done()

    def start_loading(self) -> None:
        """Begin a load attempt in the background, unless loaded, loading, or waiting to retry."""
        if self.reranker is None and not self.loading and self._retry is None:
            self._loading = asyncio.get_running_loop().create_task(self._attempt(), name="kalm-rag-load")

    async def _attempt(self) -> None:
        loader = self._source
        assert callable(loader)
        try:
            reranker = await asyncio.to_thread(loader)
        except Exception as exc:
            self.load_failures += 1
            delay = min(LOAD_RETRY_S * 2 ** (self.load_failures - 1), LOAD_RETRY_MAX_S)
            logger.error(
                "loading the model failed (attempt %d; retrying in %g s): %s: %s",
                self.load_failures,
                delay,
                type(exc).__name__,
                exc,
            )
            self._retry = asyncio.get_running_loop().call_later(delay, self._retry_now)
            return
        self._ready(reranker)

    def _retry_now(self) -> None:
        self._retry = None
        self.start_loading()

    async def require(self) -> tuple[Reranker, DynamicBatcher]:
        """The loaded reranker and batcher, or 503 while loading (or after a failed load, until a retry works)."""
        if self.reranker is None or self.batcher is None:
            self.start_loading()
            if self.load_failures and not self.loading:
                raise ApiError(503, "the model failed to load; a retry follows shortly", error_type="model_unavailable")
            raise ApiError(503, "the model is loading; retry shortly", error_type="service_unavailable")
        return self.reranker, self.batcher

    async def close(self) -> None:
        """Stop loading, drain the model worker, close the reranker the service loaded."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()  # the thread finishes on its own; its reranker is dropped
        if self.batcher is not None:
            await self.batcher.stop()
        if self.reranker is not None and self._owns_reranker:
            self.reranker.close()

    # ----- model work -----------------------------------------------------------------------------------

    async def rank(self, http: Request, request: ScoreRequest) -> list[float]:
        """Margins of ``request``'s passages, in input order.

        Work stops as soon as the client disconnects or the request is cancelled (a shutdown past its
        graceful timeout): queued model work for it is dropped, not scored.
        """
        _, batcher = await self.require()
        work = asyncio.ensure_future(self._score(batcher, request))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():
                work.cancel()
        if work not in done:
            raise ApiError(499, "the client closed the connection", error_type="client_closed")
        return work.result()

    async def _score(self, batcher: DynamicBatcher, request: ScoreRequest) -> list[float]:
        distinct = list(dict.fromkeys(request.passages))
        if len(distinct) > self.encode_chunk:
            missing = await asyncio.to_thread(_missing, batcher.reranker, distinct)  # off the model worker
            if len(missing) > self.encode_chunk:  # encode them in steps first (see encode), then score hits
                await self.encode(missing, strict=False)
        return await batcher.score(request)

    async def encode(self, texts: Sequence[str], *, strict: bool = True) -> tuple[int, int]:
        """Encode ``texts`` into the store in steps of ``encode_chunk`` on the model worker; ``(distinct, encoded
        now)``. Other requests' work runs between the steps, so a large request never holds the worker for long.
        """
        reranker, batcher = await self.require()
        distinct = list(dict.fromkeys(texts))
        encoded = 0
        for start in range(0, len(distinct), self.encode_chunk):
            chunk = distinct[start : start + self.encode_chunk]
            encoded += await batcher.call(functools.partial(self._encode_chunk, reranker, chunk, strict))
        return len(distinct), encoded

    def _encode_chunk(self, reranker: Reranker, chunk: list[str], strict: bool) -> int:
        before = reranker.counters["encoded_passages"]
        try:
            # strict (/v1/encode): raises when the store does not keep them; scoring recomputes instead
            report = reranker.encode(chunk, strict=strict, show_progress_bar=False)
        finally:
            self.metrics.encoded_passages.inc(reranker.counters["encoded_passages"] - before)
        return report.encoded

    async def refuse_long_texts(self, texts: list[str], field: str) -> None:
        """422 for the first text the tokenizer would cut at the passage limit (TEI ``truncate: false``).

        A text is cut when its ids at the server's limit differ from its ids with a limit four times larger.
        """
        reranker, batcher = await self.require()
        limit = reranker.max_passage_tokens

        def cut() -> list[bool]:  # on the model worker: the tokenizer is not shared across threads
            with _quiet(reranker):
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
        """422 for a Cohere ``max_tokens_per_doc`` below the passage limit (stored encodings are made at it)."""
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


def _missing(reranker: Reranker, texts: list[str]) -> list[str]:
    """The texts the store does not hold (none when it cannot be read: scoring then recomputes and warns)."""
    try:
        present = reranker.store.contains_many(reranker.namespace, [passage_key(t) for t in texts])
    except Exception:  # an optimisation only: scoring handles (and reports) a failing store
        logger.debug("cannot tell which passages the store holds", exc_info=True)
        return []
    return [t for t, p in zip(texts, present) if not p]


def passage_token_limit(reranker: Reranker) -> int:
    """Tokens the tokenizer keeps of a long passage: the model's cap or ``max_passage_tokens``.

    Found by tokenising a long probe text; the backend's "passages were cut" warning is for user input, so the
    probe neither logs it nor counts as a cut passage.
    """
    long_text = " ".join(["kalm"] * (reranker.max_passage_tokens + 8))
    with _quiet(reranker):
        return len(reranker.backend.tokenize_passages([long_text], reranker.max_passage_tokens)[0])


@contextlib.contextmanager
def _quiet(reranker: Reranker) -> Iterator[None]:
    """Silence the backend's own log and keep its cut-passage count, around tokenising that is not user input."""
    backend = reranker.backend
    log = logging.getLogger(type(backend).__module__)
    cut_before = getattr(backend, "passages_cut", None)
    log.addFilter(_drop)
    try:
        yield
    finally:
        log.removeFilter(_drop)
        if cut_before is not None:
            backend.passages_cut = cut_before  # type: ignore[attr-defined]


def _drop(record: logging.LogRecord) -> bool:
    return False


async def _disconnected(http: Request) -> None:
    """Return once the client has gone (the body is read already: the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
