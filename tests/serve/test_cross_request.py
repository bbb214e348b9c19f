"""Cross-request batching (issue 26): the batcher puts rows of different queries, sizes, instructions and ratios in
one decoder call, and no ranking changes (64 concurrent requests, in process and through a real server).
"""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from kalm_rag import Reranker, ScoreRequest
from kalm_rag.scores import rank_order
from kalm_rag.serve.batching import BatchReport, DynamicBatcher
from tests.serve.conftest import API_KEY
from tests.serve.helpers import CORPUS, QUERIES, assert_ranking, metric, metric_values

RATIOS = (4, 8, 12, 16, 32)  # multiples of kalm-mini's default base ratio 4 (its compact store)
INSTRUCTIONS = (None, "Judge whether the passage names a place.")


def mixed_requests(n: int, seed: int) -> list[ScoreRequest]:
    """``n`` requests of different queries (each query text distinct), 1-20 passages, several ratios."""
    rng = random.Random(seed)
    return [
        ScoreRequest(
            f"{QUERIES[i % len(QUERIES)]} ({i})",
            rng.sample(CORPUS, rng.randint(1, 20)),
            instruction=INSTRUCTIONS[i % 2],
            ratio=RATIOS[i % len(RATIOS)],
        )
        for i in range(n)
    ]


async def test_64_concurrent_mixed_requests_keep_their_rankings(reference: Reranker) -> None:
    reports: list[BatchReport] = []
    batcher = DynamicBatcher(reference, max_batch_passages=256, max_wait_ms=50, on_batch=reports.append)
    requests = mixed_requests(64, seed=7)
    results = await asyncio.gather(*(batcher.score(r) for r in requests))
    await batcher.stop()
    for req, margins in zip(requests, results, strict=True):
        alone = reference.score(
            req.query, req.passages, instruction=req.instruction, ratio=req.ratio, return_margin=True
        )
        assert margins == pytest.approx(alone, abs=1e-5)
        assert rank_order(margins) == rank_order(alone)
    calls = sum(r.counters["decoder_calls"] for r in reports)
    rows = sum(r.counters["decoder_rows"] for r in reports)
    assert rows == sum(len(r.passages) for r in requests)
    assert calls < len(requests) / 2  # rows of different queries shared decoder calls
    assert rows / calls > max(len(r.passages) for r in requests)  # more rows per call than any one request has


def test_64_concurrent_mixed_requests_through_the_server(server, client, reference: Reranker) -> None:
    requests = mixed_requests(64, seed=11)
    before = metric_values(client.get("/metrics").text)

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120.0, limits=limits) as c:
            return await asyncio.gather(
                *(
                    c.post(
                        "/v2/rerank",
                        json={"model": "m", "query": r.query, "documents": list(r.passages), "ratio": r.ratio}
                        | ({"instruction": r.instruction} if r.instruction else {}),
                    )
                    for r in requests
                )
            )

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    for req, response in zip(requests, responses, strict=True):
        got = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
        kwargs = {"instruction": req.instruction} if req.instruction else {}
        assert_ranking(got, expected_at(reference, req, **kwargs))
    after = metric_values(client.get("/metrics").text)
    calls = metric(after, "kalm_rag_decoder_calls_total") - metric(before, "kalm_rag_decoder_calls_total")
    rows = metric(after, "kalm_rag_decoder_rows_total") - metric(before, "kalm_rag_decoder_rows_total")
    assert rows == sum(len(r.passages) for r in requests)
    assert 0 < calls < 64  # requests shared decoder calls
    per_call = metric(after, "kalm_rag_decoder_rows_per_call_count") - metric(
        before, "kalm_rag_decoder_rows_per_call_count"
    )
    assert per_call == calls


def expected_at(reference: Reranker, req: ScoreRequest, **kwargs) -> list[tuple[int, float]]:
    return [(r.index, r.score) for r in reference.rerank(req.query, list(req.passages), ratio=req.ratio, **kwargs)]
