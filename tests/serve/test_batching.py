"""The dynamic batcher and ``Reranker.score_many`` in this process (no server): coalescing, bounds, isolation."""

from __future__ import annotations

import asyncio

import pytest

from kalm_rag import InvalidInputError, Reranker, ScoreRequest
from kalm_rag.serve.batching import BatchReport, DynamicBatcher, ServiceStoppingError, probabilities
from tests.serve.helpers import CORPUS, QUERIES, request_set


def test_score_many_equals_score_per_request(reference: Reranker):
    requests = [
        ScoreRequest(QUERIES[0], CORPUS[:5]),
        ScoreRequest(QUERIES[1], CORPUS[3:9], ratio=8),
        ScoreRequest(QUERIES[0], CORPUS[10:13]),  # same prompt as the first: one decoder pass for both
        ScoreRequest(QUERIES[2], CORPUS[:2], instruction="Does the passage name a river?"),
        ScoreRequest(QUERIES[3], []),
    ]
    got = reference.score_many(requests)
    for req, scores in zip(requests, got):
        want = reference.score(req.query, req.passages, instruction=req.instruction, ratio=req.ratio)
        assert scores == pytest.approx(want, abs=1e-5)
    margins = reference.score_many(requests[:2], return_margin=True)
    assert margins[0] == pytest.approx(reference.score(QUERIES[0], CORPUS[:5], return_margin=True), abs=1e-5)
    assert probabilities(margins[0]) == pytest.approx(got[0], abs=1e-6)


def test_score_many_reads_each_distinct_passage_once(reference: Reranker):
    fresh = [f"score_many fresh passage {i} about rivers and capitals" for i in range(4)]
    before = dict(reference.counters)
    reference.score_many([ScoreRequest(QUERIES[0], fresh[:3]), ScoreRequest(QUERIES[1], fresh[1:])])
    grew = {k: reference.counters[k] - before[k] for k in before}
    assert grew["store_misses"] == 4 and grew["encoded_passages"] == 4 and grew["store_hits"] == 0
    assert grew["scored_pairs"] == 6


def test_score_many_names_a_bad_request(reference: Reranker):
    with pytest.raises(InvalidInputError, match=r"requests\[1\].query"):
        reference.score_many([ScoreRequest("q", ["p"]), ScoreRequest(" ", ["p"])])
    with pytest.raises(InvalidInputError, match="ratio"):
        reference.score_many([ScoreRequest("q", ["p"], ratio=33)])


async def _run(batcher: DynamicBatcher, requests: list[ScoreRequest]) -> list[list[float] | BaseException]:
    return await asyncio.gather(*(batcher.score(r) for r in requests), return_exceptions=True)


async def test_concurrent_jobs_are_coalesced_within_the_passage_bound(reference: Reranker):
    reports: list[BatchReport] = []
    batcher = DynamicBatcher(reference, max_batch_passages=12, max_wait_ms=50, on_batch=reports.append)
    requests = [ScoreRequest(q, docs) for q, docs in request_set(9, 4, seed=3)]
    results = await _run(batcher, requests)
    await batcher.stop()
    for req, margins in zip(requests, results):
        assert margins == pytest.approx(reference.score(req.query, req.passages, return_margin=True), abs=1e-5)
    assert sum(r.requests for r in reports) == 9 and sum(r.passages for r in reports) == 36
    assert all(r.passages <= 12 for r in reports)
    assert len(reports) < 9  # 4-passage jobs fit three to a batch
    assert all(len(r.queue_seconds) == r.requests for r in reports)


async def test_a_job_over_the_bound_runs_alone_and_order_is_kept(reference: Reranker):
    reports: list[BatchReport] = []
    batcher = DynamicBatcher(reference, max_batch_passages=4, max_wait_ms=20, on_batch=reports.append)
    requests = [ScoreRequest(QUERIES[0], CORPUS[:2]), ScoreRequest(QUERIES[1], CORPUS[:9]), ScoreRequest("q", ["p"])]
    await _run(batcher, requests)
    await batcher.stop()
    assert [r.passages for r in reports] == [2, 9, 1]


async def test_batching_off_runs_every_job_alone(reference: Reranker):
    reports: list[BatchReport] = []
    batcher = DynamicBatcher(reference, enabled=False, max_wait_ms=50, on_batch=reports.append)
    await _run(batcher, [ScoreRequest(q, docs) for q, docs in request_set(5, 3, seed=4)])
    await batcher.stop()
    assert [r.requests for r in reports] == [1] * 5


async def test_a_bad_job_fails_alone(reference: Reranker):
    batcher = DynamicBatcher(reference, max_wait_ms=50)
    requests = [ScoreRequest(QUERIES[0], CORPUS[:3]), ScoreRequest(QUERIES[1], ["ok", "  "]), ScoreRequest("q", ["p"])]
    first, bad, last = await _run(batcher, requests)
    await batcher.stop()
    assert isinstance(bad, InvalidInputError) and "passages[1]" in str(bad)
    assert first == pytest.approx(reference.score(QUERIES[0], CORPUS[:3], return_margin=True), abs=1e-5)
    assert isinstance(last, list) and len(last) == 1


async def test_stop_finishes_queued_work_then_refuses_more(reference: Reranker):
    depths: list[int] = []
    batcher = DynamicBatcher(reference, max_batch_passages=1, on_queue_depth=depths.append)
    jobs = [asyncio.ensure_future(batcher.score(ScoreRequest(q, docs))) for q, docs in request_set(4, 2, seed=5)]
    calls = asyncio.ensure_future(batcher.call(lambda: "model work between batches"))
    await asyncio.sleep(0)
    await batcher.stop()
    assert all(job.done() and len(job.result()) == 2 for job in jobs)
    assert calls.result() == "model work between batches"
    assert max(depths) >= 3 and depths[-1] == 0
    with pytest.raises(ServiceStoppingError):
        await batcher.score(ScoreRequest("q", ["p"]))


def test_bounds_are_checked(reference: Reranker):
    with pytest.raises(InvalidInputError, match="max_batch_passages"):
        DynamicBatcher(reference, max_batch_passages=0)
    with pytest.raises(InvalidInputError, match="max_wait_ms"):
        DynamicBatcher(reference, max_wait_ms=-1)


class _WorkerCrash(BaseException):
    """Not an Exception: it gets past every handler on the way, so the worker task dies."""


def _model_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("kalm-rag-model")]


async def test_a_dead_worker_fails_what_waits_and_restarts_with_one_thread(reference: Reranker, monkeypatch):
    from kalm_rag.serve.batching import ModelWorkerError

    real = Reranker.score_many
    crashes = [True]

    def score_many(self, requests, *, return_margin=False):
        if crashes and crashes.pop():
            raise _WorkerCrash("fatal")
        return real(self, requests, return_margin=return_margin)

    monkeypatch.setattr(Reranker, "score_many", score_many)
    batcher = DynamicBatcher(reference, max_batch_passages=2, max_wait_ms=0)
    requests = [ScoreRequest(q, CORPUS[:2]) for q in QUERIES[:3]]  # one per batch: two wait behind the first
    results = await asyncio.wait_for(_run(batcher, requests), 60)  # nothing waits forever
    assert all(isinstance(r, ModelWorkerError) for r in results), results
    assert batcher.queue_depth == 0
    margins = await batcher.score(requests[0])  # the next submission starts a fresh worker
    assert margins == pytest.approx(reference.score(QUERIES[0], CORPUS[:2], return_margin=True), abs=1e-5)
    assert batcher.restarts == 1
    await asyncio.sleep(0.1)  # the released thread ends once idle
    assert len(_model_threads()) == 1, _model_threads()
    await batcher.stop()
    assert _model_threads() == []


async def test_every_job_has_a_deadline_and_late_jobs_are_not_run(reference: Reranker, monkeypatch):
    import threading

    from kalm_rag.serve.batching import RequestTimeoutError

    real = Reranker.score_many
    release = threading.Event()
    ran: list[str] = []

    def score_many(self, requests, *, return_margin=False):
        ran.extend(r.query for r in requests)
        release.wait(10)  # the first batch holds the worker until the test lets it go
        return real(self, requests, return_margin=return_margin)

    monkeypatch.setattr(Reranker, "score_many", score_many)
    batcher = DynamicBatcher(reference, max_batch_passages=2, max_wait_ms=0, timeout_s=0.3)
    requests = [ScoreRequest(q, CORPUS[:2]) for q in QUERIES[:2]]
    results = await _run(batcher, requests)
    assert all(isinstance(r, RequestTimeoutError) for r in results), results
    release.set()
    await batcher.stop()
    assert ran == [QUERIES[0]]  # the job that timed out while queued was never scored
