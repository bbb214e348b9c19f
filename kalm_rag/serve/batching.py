"""Dynamic batching: one model worker per process drains a queue of scoring jobs and runs them together.

Request handlers put a job (one query and its passages) on an asyncio queue and wait for its future. The
worker takes the first job, then keeps taking jobs that are already queued, or that arrive within
``max_wait_ms`` of the first, until the batch holds ``max_batch_passages`` passages; it runs the whole
batch with :meth:`kalm_rag.Reranker.score_many` on its own thread (one thread hop per batch, never more
than one batch at a time, so the model is never oversubscribed) and hands each job its scores. A job with
more passages than ``max_batch_passages`` runs as a batch of its own; jobs are never split.

What a batch shares: everything. All its jobs go through the engine in one
:meth:`~kalm_rag.Reranker.score_many` call: one store read, one encoder pass for their misses, and decoder
calls over rows of several queries at once (the backends' multi-prompt path, ``FBNLBackend.margins_many``),
up to the reranker's ``batch_size`` rows per call; a job's margins equal the job scored alone (within 1e-5
in float32), so batching never changes a ranking. Other model work (pre-encoding, token counts) goes through
the same queue with :meth:`DynamicBatcher.call`, so it never runs beside a batch.

Failures: every job and call has a deadline (``timeout_s``: :class:`RequestTimeoutError`, and the worker skips
it); if the worker task itself dies, everything waiting fails with :class:`ModelWorkerError` and the next
submission starts a fresh worker (the old model thread is let go, never left running beside the new one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kalm_rag.engine import Reranker, ScoreRequest
from kalm_rag.errors import InvalidInputError, KalmError
from kalm_rag.scores import probabilities
from kalm_rag.validation import check_positive_int

logger = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = ["BatchReport", "DynamicBatcher", "ServiceStoppingError", "probabilities"]

#: Engine counters whose growth during a batch is reported to the observer.
COUNTERS = ("store_hits", "store_misses", "encoded_passages", "scored_pairs", "decoder_calls", "decoder_rows")


class ServiceStoppingError(KalmError):
    """The batcher is stopping (the server is shutting down) and takes no new work."""


class ModelWorkerError(KalmError):
    """The model worker died while this work waited for it (it restarts with the next submission)."""


class RequestTimeoutError(KalmError):
    """This work was not done within the batcher's ``timeout_s``."""


@dataclass(frozen=True)
class BatchReport:
    """What one batch did, for metrics.

    Attributes:
        requests: jobs in the batch.
        passages: passages in the batch (duplicates counted).
        seconds: time on the model worker.
        queue_seconds: how long each job waited in the queue before its batch started.
        counters: growth of the engine's work counters (``store_hits``, ``store_misses``, ...) during the batch.
    """

    requests: int
    passages: int
    seconds: float
    queue_seconds: list[float]
    counters: dict[str, int]


@dataclass
class _Job:
    request: ScoreRequest
    future: asyncio.Future[list[float]]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return len(self.request.passages)


@dataclass
class _Call:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]


_STOP = object()


class DynamicBatcher:
    """Coalesces concurrent scoring jobs into batches run by one model worker.

    Args:
        reranker: the reranker that scores (:meth:`~kalm_rag.Reranker.score_many`) and encodes.
        max_batch_passages: close a batch once it holds this many passages.
        max_wait_ms: how long the worker waits for more jobs after the first one of a batch (0: take only
            what is already queued).
        enabled: ``False`` runs every job alone, in arrival order (the "batching off" baseline).
        on_batch: called on the worker thread after each batch with its :class:`BatchReport`.
        on_queue_depth: called with the number of jobs waiting whenever it changes.
        timeout_s: deadline of each job or call, queueing included (``None``: none).
    """

    def __init__(
        self,
        reranker: Reranker,
        *,
        max_batch_passages: int = 256,
        max_wait_ms: float = 2.0,
        enabled: bool = True,
        on_batch: Callable[[BatchReport], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.reranker = reranker
        self.max_batch_passages = check_positive_int(max_batch_passages, "max_batch_passages")
        if max_wait_ms < 0:
            raise InvalidInputError(f"max_wait_ms must be >= 0, got {max_wait_ms!r}")
        self.max_wait = max_wait_ms / 1000.0
        self.enabled = enabled
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._queue: asyncio.Queue[Any] | None = None
        self._pending: Any = None  # a job taken from the queue that did not fit the last batch
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stopping = False
        self._waiting = 0  # jobs and calls queued, or held in _pending, not yet running
        self._running: list[Any] = []  # what the worker is doing now (failed with it if it dies)
        if timeout_s is not None and not timeout_s > 0:
            raise InvalidInputError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
        self.timeout_s = timeout_s
        self.restarts = 0

    # ----- life cycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the worker task is running."""
        return self._worker is not None and not self._worker.done()

    def start(self) -> None:
        """Start the worker task on the running event loop (idempotent; also done by the first job)."""
        if self._stopping:
            raise ServiceStoppingError("the batcher has been stopped")
        if self.running:
            return
        if self._worker is not None:  # it died: its model thread is let go (it ends with the work it is doing)
            self._release_executor()
            self.restarts += 1
            logger.warning("restarting the model worker (restart %d)", self.restarts)
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kalm-rag-model")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="kalm-rag-batcher")

    async def stop(self) -> None:
        """Finish every job already queued, then stop the worker; new jobs are refused from now on."""
        if self._stopping:
            return
        self._stopping = True
        if self._queue is not None and self.running:
            self._queue.put_nowait(_STOP)
            assert self._worker is not None
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def _release_executor(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (not counting the batch running now)."""
        return self._waiting

    # ----- submitting work -------------------------------------------------------------------------

    async def score(self, request: ScoreRequest) -> list[float]:
        """Margins ``z_yes - z_no`` of ``request``'s passages, in input order, once its batch has run."""
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._put(_Job(request, future))
        return await self._wait(future)

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the model worker thread, between batches, in arrival order."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._put(_Call(fn, future))
        return await self._wait(future)

    async def _wait(self, future: asyncio.Future[T]) -> T:
        """``future``'s result within the deadline; past it (or when the caller is cancelled) the future is
        cancelled, so the worker skips the work.
        """
        try:
            return await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(f"no answer from the model worker within {self.timeout_s:g} s") from None

    def _put(self, item: _Job | _Call) -> None:
        if self._stopping:
            raise ServiceStoppingError("the server is shutting down and takes no new work")
        self.start()
        assert self._queue is not None
        self._queue.put_nowait(item)
        self._waiting += 1
        self._report_depth()

    def _report_depth(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(self.queue_depth)

    # ----- the worker ------------------------------------------------------------------------------

    async def _next(self) -> Any:
        assert self._queue is not None
        if self._pending is not None:
            item, self._pending = self._pending, None
            return item
        return await self._queue.get()

    async def _collect(self, first: _Job) -> list[_Job]:
        """``first`` plus the jobs that join it (queued already, or arriving within ``max_wait``)."""
        assert self._queue is not None
        batch, size = [first], first.size
        self._running = batch  # grows with the batch: if the worker dies now, these fail too
        if not self.enabled:
            return batch
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while size < self.max_batch_passages:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if not isinstance(item, _Job) or size + item.size > self.max_batch_passages:
                self._pending = item  # the next batch starts with it: arrival order is kept
                break
            batch.append(item)
            size += item.size
        return batch

    async def _run(self) -> None:
        try:
            await self._drain()
        except asyncio.CancelledError:  # its event loop is closing
            self._fail_everything_waiting(ServiceStoppingError("the model worker was stopped"))
            raise
        except BaseException as exc:  # the worker dies: nothing may wait for it forever
            logger.error("the model worker died: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._fail_everything_waiting(ModelWorkerError(f"the model worker died ({type(exc).__name__})"))
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise

    def _fail_everything_waiting(self, error: Exception) -> None:
        """Fail the work running now, the held-back item and everything queued (their callers answer 503)."""
        items: list[Any] = [*self._running, self._pending]
        self._running, self._pending = [], None
        while self._queue is not None and not self._queue.empty():
            items.append(self._queue.get_nowait())
        for item in items:
            if isinstance(item, (_Job, _Call)):
                _settle(item.future, error)
        self._waiting = 0
        self._report_depth()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._running = []
            item = await self._next()
            if item is _STOP:
                return
            self._running = [item]
            if isinstance(item, _Call):
                self._waiting -= 1
                self._report_depth()
                if not item.future.done():
                    try:
                        item.future.set_result(await loop.run_in_executor(self._executor, item.fn))
                    except Exception as exc:  # handed to the caller, whose handler turns it into a response
                        if not item.future.done():
                            item.future.set_exception(exc)
                continue
            batch = await self._collect(item)
            self._running = list(batch)
            self._waiting -= len(batch)
            self._report_depth()
            await self._run_batch([job for job in batch if not job.future.done()])

    async def _run_batch(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._score, jobs, loop)
        except Exception as exc:  # not a scoring error (those go to their job): fail whatever is still waiting
            logger.exception("model worker failed")
            for job in jobs:
                _settle(job.future, exc)

    def _score(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        """On the worker thread: score the whole batch with one :meth:`~kalm_rag.Reranker.score_many` call.

        Every job's rows go through the decoder together, whatever their query, instructions or ratio: one
        store read, one encoder pass for the misses, and decoder calls of up to the reranker's ``batch_size``
        rows that mix prompts (``FBNLBackend.margins_many``); each margin equals the job scored alone (1e-5).
        A job that fails (bad input) is retried alone, so that it cannot fail the others.
        """
        started = time.perf_counter()
        before = {name: self.reranker.counters.get(name, 0) for name in COUNTERS}
        members = [job for job in jobs if not job.future.done()]  # a caller that has gone needs no scores
        if members:
            outcomes: list[list[float] | Exception]
            try:
                outcomes = list(self.reranker.score_many([job.request for job in members], return_margin=True))
            except Exception as exc:  # one bad job must not fail the others: each alone gets its own outcome
                outcomes = [exc] if len(members) == 1 else [self._score_alone(job) for job in members]
            for job, outcome in zip(members, outcomes):
                loop.call_soon_threadsafe(_settle, job.future, outcome)
        if self._on_batch is not None:
            self._on_batch(
                BatchReport(
                    requests=len(jobs),
                    passages=sum(job.size for job in jobs),
                    seconds=time.perf_counter() - started,
                    queue_seconds=[started - job.enqueued for job in jobs],
                    counters={name: self.reranker.counters.get(name, 0) - before[name] for name in COUNTERS},
                )
            )

    def _score_alone(self, job: _Job) -> list[float] | Exception:
        try:
            return self.reranker.score_many([job.request], return_margin=True)[0]
        except Exception as exc:
            return exc


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    """Set ``future``'s result (or exception), unless its caller has gone (cancelled)."""
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
