"""``return_evidence``: kalm-rag's extension field of the Cohere rerank body, against a real server process."""

from __future__ import annotations

import pytest

QUERY = "What is the capital of France?"
DOCS = [
    "Bananas are yellow. They grow in warm places.",
    "France is in Europe. Paris is the capital of France. It lies on the Seine.",
    "Berlin is the capital of Germany.",
]


@pytest.mark.parametrize("path", ["/v2/rerank", "/v1/rerank"])
def test_return_evidence_gives_the_engines_spans(client, reference, path):
    body = {"query": QUERY, "documents": DOCS, "top_n": 2, "return_evidence": True}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    want = reference.rerank(QUERY, DOCS, top_k=2, evidence=True)
    assert [r["index"] for r in results] == [w.index for w in want]
    for got, w in zip(results, want):
        assert [(s["start"], s["end"]) for s in got["evidence"]] == [(s.start, s.end) for s in w.evidence or ()]
        assert [s["score"] for s in got["evidence"]] == pytest.approx([s.score for s in w.evidence or ()], abs=1e-5)
        text = DOCS[got["index"]]
        assert all(0 <= s["start"] < s["end"] <= len(text) for s in got["evidence"])


def test_without_return_evidence_results_have_no_spans(client):
    response = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 200
    assert all("evidence" not in r for r in response.json()["results"])


@pytest.mark.parametrize("path", ["/v2/rerank", "/v1/rerank"])
def test_prune_mass_gives_the_engines_pruned_text_and_kept_spans(client, reference, path):
    body = {"query": QUERY, "documents": DOCS, "top_n": 2, "prune_mass": 0.5}
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    want = reference.rerank(QUERY, DOCS, top_k=2, prune_mass=0.5)
    assert [r["index"] for r in results] == [w.index for w in want]
    for got, w in zip(results, want):
        assert got["pruned_text"] == w.pruned_text
        assert [(s["start"], s["end"]) for s in got["evidence"]] == [(s.start, s.end) for s in w.evidence or ()]
    with_evidence = client.post(path, json={**body, "return_evidence": True})
    assert with_evidence.status_code == 200 and with_evidence.json()["results"] == results


def test_without_prune_mass_results_have_no_pruned_text(client):
    response = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS, "return_evidence": True})
    assert response.status_code == 200
    assert all("pruned_text" not in r and "evidence" in r for r in response.json()["results"])


@pytest.mark.parametrize("bad", [0, 1.5, -0.2, "half"])
def test_prune_mass_out_of_range_is_a_422_naming_the_field(client, bad):
    response = client.post("/v2/rerank", json={"query": QUERY, "documents": DOCS, "prune_mass": bad})
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["field"] == "prune_mass" and "prune_mass" in body["message"], body
