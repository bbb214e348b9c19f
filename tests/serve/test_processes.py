"""Several processes: two servers and two uvicorn workers on one SQLite store; graceful shutdown.

The indexing server (``slow_app``: ``create_app`` under uvicorn, its model 3 s slower per batch) encodes
passages through ``/v1/encode``; a ``kalm-rag serve --workers 2`` on the same SQLite file then ranks them
without running its encoder once (what every worker reads, another process wrote). Then the indexing
server gets SIGTERM while a request is in flight: the request is answered, then the process exits cleanly.
Last, ``kalm-rag serve`` with two workers and with one exits 0 on SIGTERM, leaking no semaphores.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serve.conftest import ServeProcess, kalm_rag_serve
from tests.serve.helpers import CORPUS, QUERIES, assert_ranking, expected, metric, metric_values

# three model-loading server processes: about a minute on a shared 2-core machine, so outside the default run
# (run them with: python -m pytest -m slow tests/serve)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DELAY = 3.0


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('shared') / 'passages.db'}"


@pytest.fixture(scope="module")
def processes(store_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    logs = tmp_path_factory.mktemp("logs")
    indexer = ServeProcess([sys.executable, "-m", "tests.serve.slow_app", "{port}", str(DELAY), store_url], logs / "a")
    workers = ServeProcess(kalm_rag_serve("--store", store_url, "--workers", "2", "--threads", "1"), logs / "b")
    try:
        indexer.wait_ready()
        workers.wait_ready()
        yield indexer, workers
    finally:
        try:
            indexer.stop()  # a no-op when the shutdown test has stopped it already
        finally:
            workers.stop()


def test_what_one_process_encodes_every_worker_of_another_reads(processes, reference):
    indexer, workers = processes
    assert len(workers.worker_pids) == 2, workers.log()
    docs = CORPUS[:24]
    encoded = httpx.post(f"{indexer.url}/v1/encode", json={"documents": docs}, timeout=300).json()
    assert (encoded["encoded"], encoded["already_present"]) == (24, 0)
    again = httpx.post(f"{workers.url}/v1/encode", json={"documents": docs}, timeout=300).json()
    assert (again["encoded"], again["already_present"], again["namespace"]) == (0, 24, encoded["namespace"])

    requests = [(QUERIES[n % len(QUERIES)], docs[n % 3 :: 3]) for n in range(16)]

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=workers.url, timeout=300) as c:
            return await asyncio.gather(*(c.post("/v2/rerank", json={"query": q, "documents": d}) for q, d in requests))

    responses = asyncio.run(run())
    for (q, d), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        assert_ranking(
            [(r["index"], r["relevance_score"]) for r in response.json()["results"]], expected(reference, q, d)
        )
    values = metric_values(httpx.get(f"{workers.url}/metrics").text)  # every worker's, added up
    assert metric(values, "kalm_rag_requests_total", endpoint="/v2/rerank", status="200") == 16
    assert metric(values, "kalm_rag_encoded_passages_total") == 0
    assert metric(values, "kalm_rag_store_misses_total") == 0
    assert metric(values, "kalm_rag_store_hits_total") >= 16 * 8 - 8 * 15  # distinct per batch; at least one each
    assert metric(values, "kalm_rag_scored_passages_total") == 16 * 8


def test_sigterm_finishes_the_request_in_flight_then_exits(processes, reference):
    indexer, _ = processes
    query, docs = QUERIES[1], CORPUS[:6]
    outcome: dict[str, object] = {}

    def call() -> None:
        try:
            outcome["response"] = httpx.post(
                f"{indexer.url}/v2/rerank", json={"query": query, "documents": docs}, timeout=60
            )
        except httpx.HTTPError as exc:
            outcome["error"] = exc
        outcome["done"] = time.monotonic()

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)  # the request is now in the model worker, which takes DELAY seconds
    stopped = time.monotonic()
    rc = indexer.stop()
    thread.join(timeout=60)
    assert "error" not in outcome, outcome
    response = outcome["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert outcome["done"] > stopped  # it was answered after the signal, not before
    assert_ranking(
        [(r["index"], r["relevance_score"]) for r in response.json()["results"]], expected(reference, query, docs)
    )
    assert rc in (0, -signal.SIGTERM) and not indexer.killed, indexer.log()  # uvicorn re-raises the signal
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{indexer.url}/health", timeout=2)


def test_sigterm_exits_0_with_several_workers_and_leaks_nothing(processes):
    _, workers = processes
    rc = workers.stop()
    assert rc == 0 and not workers.killed, workers.log()
    assert "leaked semaphore" not in workers.log() and "Traceback" not in workers.log(), workers.log()


def test_sigterm_exits_0_with_one_worker(tmp_path):
    single = ServeProcess(kalm_rag_serve("--threads", "1"), tmp_path / "single.log")
    try:
        single.wait_ready()
    finally:
        rc = single.stop()
    assert rc == 0 and not single.killed, single.log()  # the same status as with --workers 2
    assert "leaked semaphore" not in single.log(), single.log()
