"""The service through its real clients, against a real ``kalm-rag serve`` process (see conftest.py).

Every ranking is compared with the same model in this process (``Reranker.rerank``): same order, scores
within 1e-5.
"""

from __future__ import annotations

import asyncio
import json

import cohere
import httpx
import pytest
from langchain_cohere import CohereRerank as LangChainCohereRerank
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, TextNode
from llama_index.postprocessor.cohere_rerank import CohereRerank as LlamaIndexCohereRerank

from tests.serve.conftest import API_KEY, MAX_BODY, MAX_DOCUMENT_CHARS, MAX_DOCUMENTS
from tests.serve.helpers import CORPUS, QUERIES, assert_ranking, expected, metric, metric_values, request_set

pytestmark = pytest.mark.timeout(300)

QUERY = QUERIES[0]
DOCS = CORPUS[:12]


# ----- each API shape through its real client ---------------------------------------------------------


def test_cohere_sdk_v2(server, reference):
    co = cohere.ClientV2(api_key=API_KEY, base_url=server.url)
    response = co.rerank(model="kalm-mini", query=QUERY, documents=DOCS, top_n=5)
    assert_ranking([(r.index, r.relevance_score) for r in response.results], expected(reference, QUERY, DOCS, 5))
    assert response.id and response.meta.api_version.version == "2"
    assert all(getattr(r, "document", None) is None for r in response.results)  # none asked for, none sent


def test_cohere_sdk_v1_with_document_objects_and_return_documents(server, reference):
    co = cohere.Client(api_key=API_KEY, base_url=server.url)
    documents = [{"text": t, "source": f"doc-{i}"} if i % 2 else t for i, t in enumerate(DOCS)]
    response = co.rerank(model="kalm-mini", query=QUERY, documents=documents, top_n=4, return_documents=True)
    assert_ranking([(r.index, r.relevance_score) for r in response.results], expected(reference, QUERY, DOCS, 4))
    for r in response.results:
        assert r.document.text == DOCS[r.index]
        if r.index % 2:  # an object comes back with its other fields
            assert r.document.source == f"doc-{r.index}"  # type: ignore[attr-defined]
    assert response.meta.api_version.version == "1"


def test_cohere_sdk_async_client(server, reference):
    async def run():
        co = cohere.AsyncClientV2(api_key=API_KEY, base_url=server.url)
        return await asyncio.gather(*(co.rerank(model="m", query=q, documents=DOCS) for q in QUERIES[:4]))

    for q, response in zip(QUERIES[:4], asyncio.run(run())):
        assert_ranking([(r.index, r.relevance_score) for r in response.results], expected(reference, q, DOCS))


def test_langchain_cohere_rerank(server, reference):
    compressor = LangChainCohereRerank(model="kalm-mini", cohere_api_key=API_KEY, base_url=server.url, top_n=3)
    docs = [Document(page_content=t, metadata={"i": i}) for i, t in enumerate(DOCS)]
    out = compressor.compress_documents(docs, QUERY)
    assert_ranking([(d.metadata["i"], d.metadata["relevance_score"]) for d in out], expected(reference, QUERY, DOCS, 3))


def test_llama_index_cohere_rerank(server, reference):
    postprocessor = LlamaIndexCohereRerank(model="kalm-mini", api_key=API_KEY, base_url=server.url, top_n=3)
    nodes = [NodeWithScore(node=TextNode(text=t, id_=str(i)), score=0.0) for i, t in enumerate(DOCS)]
    out = postprocessor.postprocess_nodes(nodes, query_str=QUERY)
    assert_ranking([(int(n.node.node_id), n.score) for n in out], expected(reference, QUERY, DOCS, 3))


def test_tei_shape_with_httpx(client, reference):
    want = expected(reference, QUERY, DOCS)
    body = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}).json()
    assert_ranking([(r["index"], r["score"]) for r in body], want)
    assert all(r["text"] == DOCS[r["index"]] for r in body)
    raw = client.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True}).json()
    margins = reference.score(QUERY, DOCS, return_margin=True)
    assert [r["index"] for r in raw] == [i for i, _ in want]
    assert [r["score"] for r in raw] == pytest.approx([margins[r["index"]] for r in raw], abs=1e-5)
    assert all("text" not in r for r in raw)


def test_extensions_instruction_and_ratio(client, reference):
    instruction = "Judge whether the passage names a city."
    body = client.post(
        "/v2/rerank", json={"query": QUERY, "documents": DOCS, "instruction": instruction, "ratio": 8}
    ).json()
    want = [(r.index, r.score) for r in reference.rerank(QUERY, DOCS, instruction=instruction, ratio=8)]
    assert_ranking([(r["index"], r["relevance_score"]) for r in body["results"]], want)
    assert body["meta"]["ratio"] == 8
    plain = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS}).json()
    assert [r["relevance_score"] for r in plain["results"]] != [r["relevance_score"] for r in body["results"]]


# ----- concurrency ----------------------------------------------------------------------------------


def test_64_concurrent_requests_equal_the_in_process_ranking(server, client, reference):
    distinct = request_set(16, 4, seed=1)  # 16 (query, passages) pairs, each sent 4 times, interleaved
    requests = [distinct[n % 16] for n in range(64)]
    want = {n: expected(reference, q, docs) for n, (q, docs) in enumerate(distinct)}
    before = metric_values(client.get("/metrics").text)

    async def run() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120.0, limits=limits) as c:
            calls = []
            for n, (q, docs) in enumerate(requests):
                if n % 2:
                    calls.append(c.post("/v2/rerank", json={"model": "m", "query": q, "documents": docs}))
                else:
                    calls.append(c.post("/rerank", json={"query": q, "texts": docs}))
            return await asyncio.gather(*calls)

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 64
    for n, response in enumerate(responses):
        body = response.json()
        got = (
            [(r["index"], r["relevance_score"]) for r in body["results"]]
            if n % 2
            else [(r["index"], r["score"]) for r in body]
        )
        assert_ranking(got, want[n % 16])
    after = metric_values(client.get("/metrics").text)
    batches = metric(after, "kalm_rag_batch_requests_count") - metric(before, "kalm_rag_batch_requests_count")
    coalesced = metric(after, "kalm_rag_batch_requests_sum") - metric(before, "kalm_rag_batch_requests_sum")
    assert coalesced == 64
    assert batches < 64, "concurrent requests were never coalesced"


# ----- authentication, limits, bad input ----------------------------------------------------------------


def assert_error(response: httpx.Response, status: int, field: str | None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["message"] and body["error_type"]
    assert body.get("field") == field, body
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


def test_api_key_is_required_everywhere_but_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    payload = {"query": QUERY, "documents": DOCS[:2]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}, {"Authorization": "Basic x"}):
        for path in ("/v2/rerank", "/v1/rerank", "/rerank", "/v1/encode"):
            r = httpx.post(f"{server.url}{path}", json=payload, headers=headers)
            assert_error(r, 401, "Authorization")
            assert r.headers["www-authenticate"] == "Bearer"
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert_error(httpx.get(f"{server.url}{path}", headers=headers), 401, "Authorization")
    ok = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(f"{server.url}/docs", headers=ok).status_code == 200
    assert "/v2/rerank" in httpx.get(f"{server.url}/openapi.json", headers=ok).json()["paths"]
    with pytest.raises(cohere.errors.UnauthorizedError):
        cohere.ClientV2(api_key="wrong", base_url=server.url).rerank(model="m", query=QUERY, documents=DOCS)


def test_limits_answer_413_naming_the_field(client):
    assert_error(client.post("/v2/rerank", content=b"x" * (MAX_BODY + 1)), 413, "body")
    too_many = ["short text"] * (MAX_DOCUMENTS + 1)
    assert_error(client.post("/v2/rerank", json={"query": QUERY, "documents": too_many}), 413, "documents")
    assert_error(client.post("/rerank", json={"query": QUERY, "texts": too_many}), 413, "texts")
    long_doc = ["ok", "y" * (MAX_DOCUMENT_CHARS + 1)]
    assert_error(client.post("/v2/rerank", json={"query": QUERY, "documents": long_doc}), 413, "documents[1]")
    long_obj = [{"text": "ok"}, {"text": "y" * (MAX_DOCUMENT_CHARS + 1)}]
    assert_error(client.post("/v1/rerank", json={"query": QUERY, "documents": long_obj}), 413, "documents[1].text")

    async def chunked() -> httpx.Response:  # no content-length: the size is counted as the body streams in
        async def body():
            for _ in range(MAX_BODY // 1024 + 2):
                yield b"x" * 1024

        headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
        async with httpx.AsyncClient(base_url=str(client.base_url), headers=headers) as c:
            return await c.post("/v2/rerank", content=body())

    assert_error(asyncio.run(chunked()), 413, "body")


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v2/rerank", {"documents": ["a"]}, "query"),
        ("/v2/rerank", {"query": "  ", "documents": ["a"]}, "query"),
        ("/v2/rerank", {"query": "q", "documents": ["a", 3]}, "documents[1]"),
        ("/v2/rerank", {"query": "q", "documents": ["a", " "]}, "documents[1]"),
        ("/v2/rerank", {"query": " ", "documents": []}, "query"),  # an empty list still has its query checked
        ("/v2/rerank", {"query": "q", "documents": "a"}, "documents"),
        ("/v1/rerank", {"query": "q", "documents": [{"title": "no text"}]}, "documents[0].text"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, "top_n"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": MAX_DOCUMENTS + 1}, "top_n"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "top_n": "three"}, "top_n"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "ratio": 64}, "ratio"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "instruction": ""}, "instruction"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 16}, "max_tokens_per_doc"),
        ("/rerank", {"query": "q", "texts": ["a"], "truncation_direction": "Left"}, "truncation_direction"),
        ("/rerank", {"query": "q", "texts": ["a", "long " * 1200], "truncate": False}, "texts[1]"),
        ("/v1/encode", {"documents": [None]}, "documents[0]"),
    ],
)
def test_bad_input_answers_422_naming_the_field(client, path, payload, field):
    body = assert_error(client.post(path, json=payload), 422, field)
    assert field.split("[")[0] in body["message"]


SURROGATE = "text \ud800"


@pytest.mark.parametrize(
    ("path", "payload", "field"),
    [
        ("/v2/rerank", {"query": "q", "documents": ["a", SURROGATE]}, "documents[1]"),
        ("/v2/rerank", {"query": SURROGATE, "documents": ["a"]}, "query"),
        ("/v2/rerank", {"query": "q", "documents": ["a"], "instruction": SURROGATE}, "instruction"),
        ("/rerank", {"query": "q", "texts": [SURROGATE]}, "texts[0]"),
        ("/v1/encode", {"documents": [{"text": SURROGATE}]}, "documents[0].text"),
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"title": SURROGATE, "text": "b"}], "rank_fields": ["title"]},
            "documents[0].title",
        ),
        (
            "/v2/rerank",
            {"query": "q", "documents": [{"text": "a", "source": SURROGATE}], "return_documents": True},
            "documents[0].source",
        ),
    ],
)
def test_lone_surrogates_answer_422_naming_the_field(client, path, payload, field):
    # json.dumps escapes the surrogate as \ud800, which JSON allows and Python decodes to a lone surrogate
    response = client.post(path, content=json.dumps(payload).encode(), headers={"content-type": "application/json"})
    body = assert_error(response, 422, field)
    assert "lone surrogate" in body["message"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"query": "q" * 8193, "documents": ["a"]}, "query"),
        ({"query": "q", "documents": ["a"], "instruction": "i" * 8193}, "instruction"),
        ({"query": "q", "documents": ["a"], "system_instruction": "s" * 8193}, "system_instruction"),
    ],
)
def test_long_query_and_instruction_answer_413_before_tokenising(client, payload, field):
    # the limit (--max-query-chars, 8192 by default) is checked in characters before the model worker sees it
    body = assert_error(client.post("/v2/rerank", json=payload), 413, field)
    assert "8192" in body["message"]
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"query": "caf\xe9", "documents": ["a"]}', "not UTF-8"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b'{"query": "q", "documents": ["a"], "top_n": ' + b"9" * 5000 + b"}", "number too long"),
        (b'{"query": "q", "documents": ["a"],}', "not valid JSON"),
        (b'{"query": ', "not valid JSON"),
    ],
)
def test_every_parse_error_has_one_shape(client, content, reason):
    response = client.post("/v2/rerank", content=content, headers={"content-type": "application/json"})
    body = assert_error(response, 422, "body")
    assert body["error_type"] == "invalid_json" and reason in body["message"]
    assert body["errors"] == [{"field": "body", "message": body["message"]}]


def test_empty_document_lists_answer_empty_results(client):
    v2 = client.post("/v2/rerank", json={"query": QUERY, "documents": [], "top_n": 3})
    assert v2.status_code == 200, v2.text
    assert v2.json()["results"] == [] and v2.json()["meta"]["api_version"]["version"] == "2"
    assert client.post("/v1/rerank", json={"query": QUERY, "documents": []}).json()["results"] == []
    tei = client.post("/rerank", json={"query": QUERY, "texts": []})
    assert tei.status_code == 200 and tei.json() == []
    encoded = client.post("/v1/encode", json={"documents": []}).json()
    assert (encoded["documents"], encoded["distinct"], encoded["encoded"]) == (0, 0, 0)


def test_every_answer_carries_a_request_id(server, client):
    ok = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS[:2]})
    assert len(ok.headers["x-request-id"]) == 32
    refused = httpx.post(f"{server.url}/v2/rerank", json={})  # no key: answered by the middleware
    assert refused.json()["request_id"] == refused.headers["x-request-id"]
    bad = client.post("/v2/rerank", json={"query": " ", "documents": ["a"]}, headers={"x-request-id": "abc.123"})
    assert bad.json()["request_id"] == "abc.123" == bad.headers["x-request-id"]
    odd = client.get("/health", headers={"x-request-id": "spaces; and=signs"})  # not a token: replaced
    assert len(odd.headers["x-request-id"]) == 32


def test_malformed_json_and_unknown_paths(client):
    assert_error(
        client.post("/v2/rerank", content=b'{"query": ', headers={"content-type": "application/json"}), 422, "body"
    )
    assert_error(client.get("/v3/rerank"), 404, None)
    assert_error(client.get("/v2/rerank"), 405, None)


def test_accepted_edge_cases(client, reference):
    # top_n above the document count returns them all (Cohere's behaviour); max_tokens_per_doc at or above the
    # server's limit, unknown fields and truncate=true are accepted
    limit = client.get("/health").json()["max_passage_tokens"]
    body = client.post(
        "/v2/rerank",
        json={"query": QUERY, "documents": DOCS[:3], "top_n": 10, "max_tokens_per_doc": limit, "priority": 0},
    ).json()
    assert_ranking([(r["index"], r["relevance_score"]) for r in body["results"]], expected(reference, QUERY, DOCS[:3]))
    long_text = "long " * 1200
    tei = client.post("/rerank", json={"query": QUERY, "texts": ["a", long_text], "truncate": True})
    assert tei.status_code == 200 and len(tei.json()) == 2
    assert_ranking([(r["index"], r["score"]) for r in tei.json()], expected(reference, QUERY, ["a", long_text]))


# ----- encode, health, metrics --------------------------------------------------------------------------


def test_encode_then_rerank_counts_hits_misses_and_encoder_work(client):
    fresh = [f"A passage never seen before, number {i}, about {QUERIES[i % 8].lower()}" for i in range(6)]
    before = metric_values(client.get("/metrics").text)
    first = client.post("/v1/encode", json={"documents": [*fresh, fresh[0]]}).json()
    assert first == {**first, "documents": 7, "distinct": 6, "encoded": 6, "already_present": 0}
    again = client.post("/v1/encode", json={"documents": fresh[:4] + ["one more new passage"]}).json()
    assert (again["encoded"], again["already_present"]) == (1, 4)
    client.post("/v2/rerank", json={"query": QUERY, "documents": [*fresh, "and a last new one"]}).raise_for_status()
    client.post("/rerank", json={"query": QUERY, "texts": fresh}).raise_for_status()
    after = metric_values(client.get("/metrics").text)

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("kalm_rag_encoded_passages_total") == 6 + 1 + 1
    assert grew("kalm_rag_store_hits_total") == 6 + 6
    assert grew("kalm_rag_store_misses_total") == 1
    assert grew("kalm_rag_scored_passages_total") == 7 + 6
    assert grew("kalm_rag_requests_total", endpoint="/v1/encode", status="200") == 2
    assert grew("kalm_rag_requests_total", endpoint="/v2/rerank", status="200") == 1
    assert grew("kalm_rag_requests_total", endpoint="/rerank", status="200") == 1
    assert grew("kalm_rag_request_duration_seconds_count", endpoint="/v2/rerank") == 1
    assert grew("kalm_rag_batch_passages_sum") == 7 + 6
    assert metric(after, "kalm_rag_queue_depth") == 0
    assert metric(after, "kalm_rag_model_ready") == 1


def test_errors_are_counted_by_status(server, client):
    before = metric_values(client.get("/metrics").text)
    httpx.post(f"{server.url}/v2/rerank", json={})  # no key
    client.post("/v2/rerank", json={"query": " ", "documents": ["a"]})
    client.post("/v2/rerank", content=b"x" * (MAX_BODY + 1))
    after = metric_values(client.get("/metrics").text)
    for status in ("401", "422", "413"):
        key = {"endpoint": "/v2/rerank", "status": status}
        assert metric(after, "kalm_rag_requests_total", **key) - metric(before, "kalm_rag_requests_total", **key) == 1


def test_health_reports_the_model(server):
    body = httpx.get(f"{server.url}/health").json()
    assert body["status"] == "ok" and body["model"] == "kalm-mini"
    assert body["namespace"].startswith("kalm-mini:") and body["max_passage_tokens"] == 1024  # the default limit
    assert json.loads(json.dumps(body)) == body
